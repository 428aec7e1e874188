"""Train the embedded tiny CLIP deterministically on procedural captioned images.

``python -m clipfold.compile.tiny.train --out compile/tiny/clipfold-tiny.safetensors``
(``make train-tiny``: 6,000 steps on one thread) takes about 40 minutes on a 2-core machine (2,374 s
recorded in ``benchmarks/results/tiny_model.json``). It writes the weights (fp16
safetensors: small enough to commit; loading casts them back to the fp32 model) and the held-out
zero-shot accuracy to ``benchmarks/results/tiny_model.json``.

The loss is CLIP's symmetric contrastive loss with multiple positives: a caption that leaves out
the size or the background describes every image in the batch with the stated attributes, so the
target distribution of each row is uniform over all pairs the caption truly describes (plain CLIP
would push such true pairs apart as negatives). Each batch draws its images from two colours only,
so that shape, not colour alone, is what separates most negatives.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipfold.compile.tiny import MODEL_NAME, TEMPLATES, data, register

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "tiny_model.json"
HELD_OUT_SEED = 1_000_003  # disjoint from the training streams (seeds 0..steps)


def _normalized(images, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _targets(samples, stated) -> torch.Tensor:
    """``match[i, j]`` is 1 where caption j is true of image i."""
    n = len(samples)
    match = torch.zeros(n, n)
    for j, (size, background) in enumerate(stated):
        cj = samples[j]
        for i, si in enumerate(samples):
            match[i, j] = float(si.color == cj.color and si.shape == cj.shape
                                and size in (None, si.size) and background in (None, si.background))
    return match


def multi_positive_clip_loss(image_f, text_f, scale, match) -> torch.Tensor:
    logits = scale * image_f @ text_f.T
    image_to_text = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 1200, seed: int = HELD_OUT_SEED) -> dict:
    """Top-1/top-5 zero-shot accuracy on ``n`` held-out images with the TEMPLATES ensemble."""
    import open_clip

    from clipfold.compile.heads.zero_shot import build_zero_shot_head

    model.eval()
    labels = data.class_names()
    head = build_zero_shot_head(model, tokenizer, labels, TEMPLATES)
    cfg = open_clip.get_model_preprocess_cfg(model)
    samples = data.generate(n, seed=seed)
    truth = torch.tensor([labels.index(s.label) for s in samples])
    correct1 = correct5 = 0
    for start in range(0, n, 200):
        chunk = samples[start:start + 200]
        f = F.normalize(model.encode_image(_normalized([s.image for s in chunk], cfg["mean"], cfg["std"])), dim=-1)
        top = head.scores(f).topk(5, dim=-1).indices
        t = truth[start:start + 200]
        correct1 += int((top[:, 0] == t).sum())
        correct5 += int((top == t[:, None]).any(dim=1).sum())
    return {"images": n, "top1": correct1 / n, "top5": correct5 / n, "chance": 1 / len(labels),
            "classes": len(labels), "templates": list(TEMPLATES), "seed": seed}


def train(steps: int, batch: int, lr: float, seed: int, progress=print):
    import open_clip

    register()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    cfg = open_clip.get_model_preprocess_cfg(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    token_cache: dict[str, torch.Tensor] = {}
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        rng = np.random.default_rng((seed, step))
        # Hard negatives: each batch holds only two colours. With all six, colour alone tells most
        # pairs apart and contrastive learning never picks up shape (measured: shape-word text
        # embeddings at cosine 0.999, an image shape probe at chance).
        colors = tuple(rng.choice(list(data.COLORS), size=2, replace=False))
        samples = [data.render(rng, colors=colors) for _ in range(batch)]
        captions, stated = zip(*[(c, (sz, bg)) for c, sz, bg in (data.caption(s, rng) for s in samples)])
        for c in captions:
            if c not in token_cache:
                token_cache[c] = tokenizer([c])[0]
        tokens = torch.stack([token_cache[c] for c in captions])
        image_f = F.normalize(model.encode_image(_normalized([s.image for s in samples], cfg["mean"], cfg["std"])), dim=-1)
        text_f = F.normalize(model.encode_text(tokens), dim=-1)
        loss = multi_positive_clip_loss(image_f, text_f, model.logit_scale.exp(), _targets(samples, stated))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 50 == 0 or step == steps - 1:
            progress(f"step {step:4d}/{steps}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():5.1f}"
                     f"  {time.perf_counter() - start:6.1f}s")
    model.eval()
    return model, tokenizer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="train the embedded tiny CLIP (deterministic)")
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    from safetensors.torch import save_file

    from clipfold.runtime.bundle.files import sha256_file

    torch.set_num_threads(args.threads)
    model, tokenizer, seconds = train(args.steps, args.batch, args.lr, args.seed)
    # Evaluate exactly what ships: the weights rounded to fp16, loaded back into the fp32 model.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    accuracy = zero_shot_accuracy(model, tokenizer)
    print(f"held-out zero-shot top-1 {accuracy['top1']:.3f}, top-5 {accuracy['top5']:.3f} "
          f"(chance {accuracy['chance']:.3f}) after {seconds:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"model": MODEL_NAME, "steps": str(args.steps), "seed": str(args.seed)})
    record = {
        "model": MODEL_NAME, "checkpoint_sha256": sha256_file(args.out), "zero_shot": accuracy,
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "threads": args.threads, "seconds": round(seconds, 1)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {args.results}")


if __name__ == "__main__":
    main()
