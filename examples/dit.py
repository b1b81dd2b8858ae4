"""DiT (class-conditional) with ditfast: the same diffusers DiTPipeline timed before and after ``ditfast.patch``.

    python examples/dit.py               # CUDA present: DiT-XL/2-256 from the Hub; otherwise a tiny random DiT on CPU
    python examples/dit.py --tiny        # tiny random weights on whatever device (no download, a few seconds)
    python examples/dit.py --real --model facebook/DiT-XL-2-512 --size 512

DiTPipeline has no text encoder, so the tiny run is the whole pipeline (transformer, VAE, scheduler) with
tiny random weights, and neither run needs ``transformers``. The real run needs a GPU and the checkpoint
from the Hub. It prints both timings, the speed-up and the largest difference between the two outputs.
"""
import torch

import ditfast
from _common import parse, randomize_, report, timed, to

CLASSES = [207, 360, 387, 974]  # ImageNet: golden retriever, otter, red panda, geyser


def tiny_pipeline(setup):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_eps=1e-6)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4)
    pipe = DiTPipeline(transformer=randomize_(transformer).eval(), vae=randomize_(vae, 1), scheduler=DDIMScheduler())
    return to(pipe, setup.device, setup.dtype)


def main():
    setup = parse(__doc__.splitlines()[0], model="facebook/DiT-XL-2-256", steps=25, size=256)
    if setup.real:
        from diffusers import DiTPipeline

        pipe = DiTPipeline.from_pretrained(setup.args.model, torch_dtype=setup.dtype).to(setup.device)
        labels = CLASSES
    else:
        pipe, labels = tiny_pipeline(setup), CLASSES[:2]
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator(setup.device).manual_seed(setup.args.seed)  # the same noise every call
        return pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=setup.args.steps,
                    generator=generator, output_type="pt").images

    before = timed(generate, setup.device, setup.args.runs)
    ditfast.patch(pipe)  # in place: pipe.transformer's adaLN-Zero blocks now run on ditfast's fused ops
    after = timed(generate, setup.device, setup.args.runs)
    side = after[0].shape[-1]
    what = (f"DiTPipeline, {len(labels)} images of {side}x{side}, {setup.args.steps} steps, classifier-free guidance"
            + ("" if setup.real else " (tiny random weights)"))
    report(what, setup, before, after)


if __name__ == "__main__":
    main()
