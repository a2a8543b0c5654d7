"""Training step of the linear probe with [cls], average and AbMILP pooling, side by side on in-memory
tensors: the frozen encoder's forward (eval mode, no autograd graph) + the head's forward, backward and
LARS (MAE's probe); and on cached tokens (--cache-features: the encoder runs once, not per step), served as
train() serves them: bf16 on the device, a batch = one index of the epoch's randperm into them, no collate.
The FLOP ratio is ~1.00: the head is a few D x K matmuls next to the encoder's forward.

    python benchmarks/bench_abmilp_probe.py                                      # CPU, vit_demo at 64 px
    python benchmarks/bench_abmilp_probe.py --model vit_b --img-size 224 --batch-size 1024 --device cuda --compile
"""
import torch

import timing  # first: it puts the repository on the path
import abmilp_probe as ap  # noqa: E402
import probe_cache  # noqa: E402
import vit  # noqa: E402


def head_flops(pool, N, D, K):
    """Training FLOPs of the head per image (forward + 2x backward): classifier D K; AbMILP's t N D + its sum N D."""
    macs = D * K + {"cls": 0, "avg": N * D, "abmilp": 2 * N * D}[pool]
    return 3 * 2 * macs


def served(probe, tokens, labels, B, device, opt):
    """A step on a cache as cache_steps serves it: rows tokens[ids] for B ids of a randperm (a fresh one per step here)."""
    batch = [None, None]  # train_step calls probe(*batch): refilled before each step
    step = timing.train_step(probe, batch, device, opt=opt)

    def run():
        ids = torch.randperm(len(tokens), device=device)[:B]
        batch[:] = tokens[ids], labels[ids]
        step()
    return run


def main():
    p = timing.parser(__doc__, img_size=64, batch_size=128)
    p.add_argument("--classes", type=int, default=1000, help="K, the classifier's outputs (ImageNet: 1000)")
    args, device = timing.setup(p)
    n, T, D = 1_281_167, 197, 768  # ImageNet train at vit_b, 224 px
    full, condensed = (probe_cache.cache_bytes(n, rows, D) / 2**30 for rows in (T, 2))
    print(f"ImageNet train cache at vit_b in bf16: all {T} tokens {full:.1f} GiB, condensed ([cls], patch mean) "
          f"{condensed:.2f} GiB (fp32 tokens: {2 * full:.0f} GiB)")
    B = args.batch_size
    x = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.classes, (B,), device=device)
    enc = vit.vit(args.model, args.img_size).to(device)  # shared, frozen: Probe sets requires_grad False and eval
    N, D = enc.grid[0] * enc.grid[1], enc.dim

    def case(pool, cached=None):
        def build():
            probe = ap.Probe(enc, args.classes, pool).to(device)
            opt = ap.LARS([q for q in probe.parameters() if q.requires_grad], lr=0.1)
            if cached:  # 4 batches of tokens once, outside the step; the encoder is not compiled: it is not timed
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    t = probe.features(x).float()  # (B, 1 + N, D)
                t = torch.cat([t[:, :1], t[:, 1:].mean(1, keepdim=True)], 1) if cached == "condensed" else t
                step = served(probe, torch.cat([t] * 4).bfloat16(), torch.cat([y] * 4), B, device, opt)
                return step, head_flops(pool, t.shape[1] - 1, D, args.classes)
            if args.compile:  # as abmilp_probe.py --compile: the frozen encoder only
                probe.encoder = torch.compile(probe.encoder)
            return timing.train_step(probe, (x, y), device, opt=opt), vit.vit_forward_flops(enc) + head_flops(pool, N, D, args.classes)
        return build

    timing.run([("probe cls", case("cls")), ("probe avg", case("avg")), ("probe AbMILP", case("abmilp")),
                ("AbMILP cached tokens", case("abmilp", "tokens")), ("avg cached condensed", case("avg", "condensed"))], args, device)


if __name__ == "__main__":
    main()
