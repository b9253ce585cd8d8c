"""The embedded shapes model's architecture, built as Stable Diffusion 1.x is: VAE, UNet, CLIP text
encoder and the noise schedule, at the shapes world's size (64x64 images, 16x16x4 latents)."""

from __future__ import annotations

from explainer.families import FAMILIES
from explainer.shapes.tokenizer import MODEL_MAX_LENGTH

SD1 = FAMILIES["sd1"]  # the embedded model is built as Stable Diffusion 1.x is
BETA_START, BETA_END = 0.00085, 0.012


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=64,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 96, 128), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_noise_schedulers(prediction_type: str = "v_prediction", zero_terminal_snr: bool = True):
    """Training (DDPM) and sampling (DPM-Solver++) schedulers with the same noise schedule.

    ``zero_terminal_snr`` rescales the betas to zero terminal SNR (Lin et al., 2024), so x_999 holds
    no image and the text is all the model has there; it needs v-prediction (epsilon is undefined at
    SNR 0) and "trailing" spacing to start at t = 999. Why: assets/shapes-ldm/README.md.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule="scaled_linear", prediction_type=prediction_type)
    if zero_terminal_snr:
        common |= dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ddpm = DDPMScheduler(**common, clip_sample=False)
    dpm = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                      **({} if zero_terminal_snr else {"steps_offset": 1}))
    return ddpm, dpm


# --- the second embedded model: an MM-DiT built as Stable Diffusion 3 is (why: assets/shapes-mmdit/README.md)
MMDIT_TEXT_WIDTH = 32  # each of the two CLIP encoders; their penultimate states side by side fill joint_attention_dim


def make_mmdit(patch_size: int = 1, layers: int = 6, heads: int = 4, head_dim: int = 32):
    """An SD3Transformer2DModel at the shapes world's size: 16x16x4 latents, one token per latent
    cell at patch size 1 (so joint-attention maps have the UNet's finest grid, 16x16)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * MMDIT_TEXT_WIDTH,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * MMDIT_TEXT_WIDTH,
        pos_embed_max_size=16 // patch_size,
    )


def make_projected_text_encoder(tokenizer):
    """A CLIPTextModelWithProjection (SD3 takes two: their pooled outputs form the pooled projection)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=MMDIT_TEXT_WIDTH, intermediate_size=4 * MMDIT_TEXT_WIDTH,
        num_hidden_layers=3, num_attention_heads=2, projection_dim=MMDIT_TEXT_WIDTH,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def make_flow_scheduler(shift: float = 1.0):
    """Rectified flow, x_t = (1 - sigma) x0 + sigma noise, sampled by Euler steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
