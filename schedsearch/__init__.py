"""schedsearch: search few-step sampling schedules for diffusion models without retraining.

    import schedsearch
    preset = schedsearch.load_preset("sd15-5")
    images = schedsearch.generate(pipe, preset, ["a red bicycle"], seeds=[0])
"""

__version__ = "0.1.0"


def __getattr__(name):
    # keep `import schedsearch` light: torch and diffusers load on first use
    if name in ("generate", "as_model", "to_pil"):
        from . import apply
        return getattr(apply, name)
    if name in ("load_preset", "Preset"):
        from . import presets
        return {"load_preset": presets.load, "Preset": presets.Preset}[name]
    raise AttributeError(f"module 'schedsearch' has no attribute {name!r}")
