"""schedsearch: search few-step sampling schedules for diffusion models without retraining.

    import schedsearch
    preset = schedsearch.load_preset("sd15-5")
    images = schedsearch.generate(pipe, preset, ["a red bicycle"], seeds=[0])
    pipe.scheduler = schedsearch.PresetScheduler.from_preset(preset, pipe.scheduler.config)
"""

from .version import __version__

__all__ = ["__version__", "generate", "as_model", "to_pil", "load_preset", "Preset",
           "PresetScheduler", "freeu_plan"]
_LAZY = {"generate": "apply", "as_model": "apply", "to_pil": "apply", "load_preset": "presets",
         "Preset": "presets", "PresetScheduler": "diffusers", "freeu_plan": "diffusers"}


def __getattr__(name):
    # lazy: `import schedsearch` stays light; torch (seconds to import) loads on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'schedsearch' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    return getattr(module, "load" if name == "load_preset" else name)
