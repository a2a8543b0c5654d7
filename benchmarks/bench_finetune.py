"""Fine-tuning step (whole encoder + linear head, drop path 0.1, MixUp/CutMix soft labels, layer-decay groups)
on in-memory tensors: ms/step, img/s, TFLOP/s, MFU.

    python benchmarks/bench_finetune.py                                         # CPU smoke, vit_demo at 64 px
    python benchmarks/bench_finetune.py --model vit_b --img-size 224 --batch-size 256 --device cuda --compile
"""
import torch

import timing  # first: it puts the repository on the path
import finetune  # noqa: E402
import vit  # noqa: E402


def main():
    args, device = timing.setup(timing.parser(__doc__, img_size=64, batch_size=16))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.softmax(torch.randn(args.batch_size, 1000, device=device), 1)  # soft labels, as after MixUp / CutMix

    def build():
        model = finetune.Classifier(vit.vit(args.model, args.img_size, drop_path=0.1, learned_pos=True), 1000).to(device)
        opt = torch.optim.AdamW(vit.param_groups(model, 0.05, layer_decay=0.65), lr=1e-4, fused=device.type == "cuda")
        return timing.train_step(model, (x, y), device, args.compile, opt=opt), 3 * vit.vit_forward_flops(model.encoder)

    timing.run([("fine-tune", build)], args, device)


if __name__ == "__main__":
    main()
