"""Training step of the linear probe with [cls], average and AbMILP pooling, side by side on in-memory
tensors: the frozen encoder's forward (eval mode, no autograd graph) + the head's forward, backward and
LARS (MAE's probe); and AbMILP on cached tokens (--cache-features: the encoder runs once, not per step).
The FLOP ratio is ~1.00: the head is a few D x K matmuls next to the encoder's forward.

    python benchmarks/bench_abmilp_probe.py                                      # CPU, vit_demo at 64 px
    python benchmarks/bench_abmilp_probe.py --model vit_b --img-size 224 --batch-size 1024 --device cuda --compile
"""
import torch

import timing  # first: it puts the repository on the path
import abmilp_probe as ap  # noqa: E402
import vit  # noqa: E402


def head_flops(pool, N, D, K):
    """Training FLOPs of the head per image (forward + 2x backward): classifier D K; AbMILP's t N D + its sum N D."""
    macs = D * K + {"cls": 0, "avg": N * D, "abmilp": 2 * N * D}[pool]
    return 3 * 2 * macs


def main():
    p = timing.parser(__doc__, img_size=64, batch_size=128)
    p.add_argument("--classes", type=int, default=1000, help="K, the classifier's outputs (ImageNet: 1000)")
    args, device = timing.setup(p)
    B = args.batch_size
    x = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.classes, (B,), device=device)
    enc = vit.vit(args.model, args.img_size).to(device)  # shared, frozen: Probe sets requires_grad False and eval
    N, D = enc.grid[0] * enc.grid[1], enc.dim

    def case(pool, cached):
        def build():
            probe = ap.Probe(enc, args.classes, pool).to(device)
            opt = ap.LARS([q for q in probe.parameters() if q.requires_grad], lr=0.1)
            if cached:  # the tokens once, outside the step; the encoder is not compiled: it is not timed
                with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    inp = probe.features(x).float()
            else:
                inp = x
                if args.compile:  # as abmilp_probe.py --compile: the frozen encoder only
                    probe.encoder = torch.compile(probe.encoder)
            step = timing.train_step(probe, (inp, y), device, opt=opt)
            return step, (0 if cached else vit.vit_forward_flops(enc)) + head_flops(pool, N, D, args.classes)
        return build

    timing.run([("probe cls", case("cls", False)), ("probe avg", case("avg", False)),
                ("probe AbMILP", case("abmilp", False)), ("AbMILP cached tokens", case("abmilp", True))], args, device)


if __name__ == "__main__":
    main()
