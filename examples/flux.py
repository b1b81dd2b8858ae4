"""FLUX.1 with ditfast: the same diffusers pipeline timed before and after ``ditfast.patch``.

    python examples/flux.py              # CUDA present: FLUX.1-dev from the Hub; otherwise a tiny random FLUX on CPU
    python examples/flux.py --tiny       # tiny random weights on whatever device (no download, a few seconds)
    python examples/flux.py --real --model black-forest-labs/FLUX.1-schnell --steps 4

The real run needs ``transformers`` (the text encoders; ``pip install ditfast[bench]`` brings it), a GPU
with room for FLUX.1 in bf16 (about 33 GB with the T5 encoder) and access to the checkpoint on the Hub.
The tiny run builds a FluxPipeline from tiny diffusers components (transformer, VAE, scheduler) and
passes random prompt embeddings in place of the text encoders, which would need tokenizer files from
the Hub; without ``transformers`` it drives the tiny transformer alone with random inputs, and says so.
It prints both timings, the speed-up and the largest difference between the two outputs.
"""
import torch

import ditfast
from _common import has_transformers, parse, randomize_, report, timed, to

PROMPT = "a tiny robot watering a bonsai tree, studio light"


def tiny_transformer(dtype, device):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return to(randomize_(model).eval(), device, dtype)


def tiny_pipeline(setup):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    transformer = tiny_transformer(setup.dtype, setup.device)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=randomize_(vae, 1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe = to(pipe, setup.device, setup.dtype)
    g = torch.Generator().manual_seed(setup.args.seed + 1)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g).to(setup.device, setup.dtype),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(setup.device, setup.dtype))
    return pipe, embeds, setup.args.size or 32


def run_pipeline(setup):
    if setup.real:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(setup.args.model, torch_dtype=setup.dtype).to(setup.device)
        inputs, size = dict(prompt=PROMPT), setup.args.size
    else:
        pipe, inputs, size = tiny_pipeline(setup)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator(setup.device).manual_seed(setup.args.seed)  # the same noise every call
        return pipe(**inputs, height=size, width=size, num_inference_steps=setup.args.steps, guidance_scale=3.5,
                    generator=generator, output_type="pt").images

    before = timed(generate, setup.device, setup.args.runs)
    ditfast.patch(pipe)  # in place: pipe.transformer's blocks now run on ditfast's fused ops
    after = timed(generate, setup.device, setup.args.runs)
    what = f"FluxPipeline, {size}x{size}, {setup.args.steps} steps" + ("" if setup.real else " (tiny random weights)")
    report(what, setup, before, after)


def run_transformer_alone(setup):
    print("transformers is not installed, so FluxPipeline cannot be built: timing the tiny "
          "FluxTransformer2DModel alone on random inputs (pip install transformers for the whole pipeline)")
    model = tiny_transformer(setup.dtype, setup.device)
    g = torch.Generator().manual_seed(setup.args.seed)
    side, text = 8, 8  # an 8 x 8 grid of (2 x 2-packed) latent patches and 8 text tokens
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 16, generator=g),
        encoder_hidden_states=torch.randn(1, text, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.cat([torch.zeros(side * side, 1), grid.float()], 1),  # FLUX ids: [0, row, col] per patch
        txt_ids=torch.zeros(text, 3),                                    # zeros for text tokens
    )
    inputs = {k: v.to(setup.device) if k.endswith("_ids") else v.to(setup.device, setup.dtype)
              for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            return model(**inputs).sample

    before = timed(forward, setup.device, setup.args.runs)
    ditfast.patch(model)
    after = timed(forward, setup.device, setup.args.runs)
    report("FluxTransformer2DModel forward (tiny random weights)", setup, before, after)


def main():
    setup = parse(__doc__.splitlines()[0], model="black-forest-labs/FLUX.1-dev", steps=28, size=1024)
    if setup.real or has_transformers():
        run_pipeline(setup)
    else:
        run_transformer_alone(setup)


if __name__ == "__main__":
    main()
