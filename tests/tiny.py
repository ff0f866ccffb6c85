"""Tiny, randomly initialised diffusers models built offline for tests (see docs/models.md)."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sample_size: int = 8, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


# -- tiny Stable Diffusion pipelines, saved to disk so loading goes through the real path ----------

def tiny_tokenizer():
    """A CLIP tokenizer without merges: the 256 byte-level symbols, the same with the end-of-word
    mark, and the two special tokens (514 ids). model_max_length=77 is what the pipelines pad to."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    # bos/eos are the tokenizer's ids (512, 513): the pooled output is read at the eos position
    return CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513,
                          projection_dim=projection_dim, hidden_act="gelu", layer_norm_eps=1e-5)


def tiny_vae(seed: int = 0, **overrides):
    """Four blocks like the real VAE, so the latent is 1/8 of the image (8×8 → 64×64)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def sd_scheduler(**overrides):
    from diffusers import EulerDiscreteScheduler

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")
    config.update(overrides)
    return EulerDiscreteScheduler(**config)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """An SD1.x-shaped StableDiffusionPipeline (one CLIP text encoder), randomly initialised."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed), scheduler=sd_scheduler(prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """An SDXL-shaped StableDiffusionXLPipeline: two text encoders (the second with projection)
    whose penultimate states are concatenated (32 + 32 = 64), pooled text embeddings and
    (H, W, 0, 0, H, W) time ids through addition_embed_type="text_time"."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    unet = tiny_unet(seed, cross_attention_dim=64, addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                     use_linear_projection=True)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 2), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=sd_scheduler(timestep_spacing="leading"),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


def save_pipeline(pipe, folder) -> str:
    """save_pretrained in safetensors, as a downloaded model folder looks."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


# -- the original (CompVis / A1111) single-file layout of an SD1.x pipeline ------------------------

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
             ("to_out.0", "proj_out"))


def _sub(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _ldm_unet_key(key: str, lpb: int, up_has_attn: dict) -> str:
    """The inverse of diffusers' convert_ldm_unet_checkpoint, for any number of blocks."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    p = key.split(".")
    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "downsamplers":   # down_blocks.i.downsamplers.0.conv.X
            return f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{p[-1]}"
        j, rest = int(p[3]), ".".join(p[4:])
        n = i * (lpb + 1) + j + 1
        return f"input_blocks.{n}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else \
            f"input_blocks.{n}.1.{rest}"
    if p[0] == "mid_block":
        j, rest = int(p[2]), ".".join(p[3:])
        return f"middle_block.{2 * j}.{_sub(rest, _RESNET)}" if p[1] == "resnets" else \
            f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "upsamplers":
            return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attn[i] else 1}.conv.{p[-1]}"
        j, rest = int(p[3]), ".".join(p[4:])
        n = i * (lpb + 1) + j
        return f"output_blocks.{n}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else \
            f"output_blocks.{n}.1.{rest}"
    raise KeyError(key)


def _ldm_vae_key(key: str, n_up: int) -> str:
    p = key.split(".")
    part = p[0]                                   # encoder / decoder / quant_conv / post_quant_conv
    if part in ("quant_conv", "post_quant_conv"):
        return key
    rest = ".".join(p[1:])
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{p[-1]}"
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else n_up - 1 - int(p[2])
        name = "down" if p[1] == "down_blocks" else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{part}.{name}.{i}.{name}sample.conv.{p[-1]}"
        tail = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{part}.{name}.{i}.block.{p[4]}.{tail}"
    if p[1] == "mid_block":
        if p[2] == "resnets":
            tail = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{part}.mid.block_{int(p[3]) + 1}.{tail}"
        return f"{part}.mid.attn_1.{_sub('.'.join(p[4:]), _VAE_ATTN)}"
    return key


def ldm_state_dict(pipe) -> dict:
    """An SD1.x pipeline's weights under the original single-file key names (what a
    v1-5-pruned-emaonly.safetensors holds), the layout diffusers' from_single_file converts back.
    diffusers ships only the other direction, so the map is written out here."""
    sd = {}
    lpb = pipe.unet.config.layers_per_block
    up_has_attn = {i: hasattr(b, "attentions") for i, b in enumerate(pipe.unet.up_blocks)}
    for k, v in pipe.unet.state_dict().items():
        sd["model.diffusion_model." + _ldm_unet_key(k, lpb, up_has_attn)] = v
    n_up = len(pipe.vae.config.up_block_types)
    for k, v in pipe.vae.state_dict().items():
        new = _ldm_vae_key(k, n_up)
        if ".mid.attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]                # the original VAE attention is 1×1 convs
        sd["first_stage_model." + new] = v
    for k, v in pipe.text_encoder.state_dict().items():
        # files hold transformers 4's nesting (text_model.*), which transformers 5 flattened
        k = k if k.startswith("text_model.") else "text_model." + k
        sd["cond_stage_model.transformer." + k] = v
    return {k: v.contiguous() for k, v in sd.items()}


def save_single_file(pipe, path) -> str:
    from safetensors.torch import save_file

    save_file(ldm_state_dict(pipe), str(path))
    return str(path)


# -- more tiny pipelines: SD2.x-shaped, ControlNet ------------------------------------------------

def tiny_sd2_pipeline(seed: int = 0):
    """An SD2.x-shaped StableDiffusionPipeline: v-prediction, linear attention projections and
    per-block head counts like the real SD2 UNet."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config()).eval()
    unet = tiny_unet(seed, use_linear_projection=True, attention_head_dim=(2, 4))
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2), text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
        unet=unet, scheduler=sd_scheduler(prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNetModel copied from a tiny UNet's encoder (diffusers' from_unet), with a
    conditioning embedding that maps a 64×64 control image to the 8×8 latent. diffusers starts
    its output convolutions (and the embedding's last one) at zero, so a fresh ControlNet changes
    nothing; here they get small random weights, so its residuals visibly move the sample."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                 net.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(conv.weight, std=0.05)
    return net.eval()


# -- tiny flow-matching pipelines: SD3 (MMDiT, CLIP-L + CLIP-G + T5) and FLUX (CLIP-L + T5) --------

def tiny_t5_tokenizer():
    """A T5 tokenizer built in memory: a unigram vocabulary of letters, digits and punctuation
    (with and without the word-start mark), <pad> = 0, </s> = 1, <unk> = 2, as T5's ids are."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0, model_max_length=512)


def tiny_t5(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=37,
                      num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def flow_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**overrides)


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0):
    """An SD3-shaped StableDiffusion3Pipeline: an MMDiT (patch 2, 16 latent channels), two CLIP
    encoders with projection (pooled 32 + 32 = 64) whose states are padded to T5's width (64),
    a T5 encoder, a 16-channel VAE with SD3's shift and scale, and shift-3 flow matching."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=8).eval()
    torch.manual_seed(seed + 1)
    clip_l = CLIPTextModelWithProjection(_text_config()).eval()
    clip_g = CLIPTextModelWithProjection(_text_config()).eval()
    vae = tiny_vae(seed + 2, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305,
                   use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(shift=shift), vae=vae,
        text_encoder=clip_l, tokenizer=tiny_tokenizer(), text_encoder_2=clip_g,
        tokenizer_2=tiny_tokenizer(), text_encoder_3=tiny_t5(seed + 3, d_model=64),
        tokenizer_3=tiny_t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FLUX-shaped FluxPipeline: a FLUX transformer on packed 2×2 tokens of a 16-channel latent
    (64 input features), CLIP's pooled output and T5's states, a guidance embedding (dev) or none
    (schnell), a 16-channel VAE with FLUX's shift and scale, and the dynamic (μ) shift."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(_text_config()).eval()
    vae = tiny_vae(seed + 2, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                   use_quant_conv=False, use_post_quant_conv=False)
    scheduler = flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5(seed + 3),
                        tokenizer_2=tiny_t5_tokenizer())
