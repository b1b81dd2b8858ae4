"""Stable Diffusion 3 / 3.5 with ditfast: the same diffusers pipeline timed before and after ``ditfast.patch``.

    python examples/sd3.py               # CUDA present: SD3.5-large from the Hub; otherwise a tiny random SD3.5 on CPU
    python examples/sd3.py --tiny        # tiny random weights on whatever device (no download, a few seconds)
    python examples/sd3.py --real --model stabilityai/stable-diffusion-3.5-medium

Any SD3 / SD3.5 checkpoint works (SD3-medium, SD3.5 medium with its dual attention, large, large-turbo).
The real run needs ``transformers`` (the text encoders; ``pip install ditfast[bench]`` brings it), a GPU
with room for the model in bf16 and access to the checkpoint on the Hub. The tiny run builds a
StableDiffusion3Pipeline from tiny diffusers components (an SD3.5-style transformer with QK-RMSNorm, a dual-attention
block and the pre-only last block, a VAE, the scheduler) and passes random prompt embeddings in place of the
three text encoders, which would need tokenizer files from the Hub; without ``transformers`` it drives the tiny
transformer alone with random inputs, and says so. It prints both timings, the speed-up and the largest
difference between the two outputs.
"""
import torch

import ditfast
from _common import has_transformers, parse, randomize_, report, timed, to

PROMPT = "a tiny robot watering a bonsai tree, studio light"


def tiny_transformer(dtype, device):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    return to(randomize_(model).eval(), device, dtype)


def tiny_pipeline(setup):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(transformer=tiny_transformer(setup.dtype, setup.device),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=randomize_(vae, 1),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe = to(pipe, setup.device, setup.dtype)
    g = torch.Generator().manual_seed(setup.args.seed + 1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(setup.device, setup.dtype)  # noqa: E731
    embeds = dict(prompt_embeds=rand(1, 8, 32), pooled_prompt_embeds=rand(1, 32),  # the text encoders' outputs
                  negative_prompt_embeds=rand(1, 8, 32), negative_pooled_prompt_embeds=rand(1, 32))
    return pipe, embeds, setup.args.size or 32


def run_pipeline(setup):
    if setup.real:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(setup.args.model, torch_dtype=setup.dtype).to(setup.device)
        inputs, size = dict(prompt=PROMPT), setup.args.size
    else:
        pipe, inputs, size = tiny_pipeline(setup)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator(setup.device).manual_seed(setup.args.seed)  # the same noise every call
        return pipe(**inputs, height=size, width=size, num_inference_steps=setup.args.steps, guidance_scale=3.5,
                    generator=generator, output_type="pt").images

    before = timed(generate, setup.device, setup.args.runs)
    ditfast.patch(pipe)  # in place: pipe.transformer's joint blocks now run on ditfast's fused ops
    after = timed(generate, setup.device, setup.args.runs)
    what = (f"StableDiffusion3Pipeline, {size}x{size}, {setup.args.steps} steps, classifier-free guidance"
            + ("" if setup.real else " (tiny random weights)"))
    report(what, setup, before, after)


def run_transformer_alone(setup):
    print("transformers is not installed, so StableDiffusion3Pipeline cannot be built: timing the tiny "
          "SD3Transformer2DModel alone on random inputs (pip install transformers for the whole pipeline)")
    model = tiny_transformer(setup.dtype, setup.device)
    g = torch.Generator().manual_seed(setup.args.seed)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),   # latents: 8 x 8 patches of 2 x 2
                  encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([500.0, 500.0]))
    inputs = {k: v.to(setup.device, setup.dtype) for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            return model(**inputs).sample

    before = timed(forward, setup.device, setup.args.runs)
    ditfast.patch(model)
    after = timed(forward, setup.device, setup.args.runs)
    report("SD3Transformer2DModel forward (tiny random weights)", setup, before, after)


def main():
    setup = parse(__doc__.splitlines()[0], model="stabilityai/stable-diffusion-3.5-large", steps=28, size=1024)
    if setup.real or has_transformers():
        run_pipeline(setup)
    else:
        run_transformer_alone(setup)


if __name__ == "__main__":
    main()
