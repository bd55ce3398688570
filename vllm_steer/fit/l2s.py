"""Train an L2S predictor (learn to steer, methods.md) from inputs and targets already captured.

* inputs  ``x`` [N, d]: the residual stream after layer L' at the last token of each raw prompt (or of
  its chat-template rendering, ``l2s_pipeline.L2SFitOptions.chat_template``);
* targets ``z`` [N, d]: ``h+ - h-``, the stream after layer L* for the prompt completed with the
  desired vs the undesired continuation (at the last token, or averaged over the continuation).

The predictor is ``g(x) = W_out tanh(W_in x + b_in)`` (``W_out`` without bias), K hidden units. Loss:
``"reference"`` = MSE + L1 - w * cosine(g(x), z) (the reference code's, w = 0.1) or ``"mse"``.
Adam, mini-batches, seeded; the decoder starts from the top-K right singular vectors of the centred
targets; a validation split picks the best epoch (early stopping after ``patience`` epochs without
improvement). Mean-S, the baseline, is the mean of the training targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from vllm_steer.errors import SteeringError


@dataclass(frozen=True)
class L2STrainOptions:
    width: int = 100
    loss: Literal["reference", "mse"] = "reference"
    cosine_weight: float = 0.1
    lr: float = 1e-4
    batch_size: int = 64
    epochs: int = 100
    patience: int = 10
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class L2SFit:
    w_in: torch.Tensor  # [K, d]
    b_in: torch.Tensor  # [K]
    w_out: torch.Tensor  # [d, K]
    mean: torch.Tensor  # [d] Mean-S
    record: dict = field(default_factory=dict)  # options, epochs, losses, validation cosine

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w_in.T + self.b_in) @ self.w_out.T


def _loss(pred: torch.Tensor, z: torch.Tensor, options: L2STrainOptions) -> torch.Tensor:
    mse = torch.nn.functional.mse_loss(pred, z)
    if options.loss == "mse":
        return mse
    l1 = torch.nn.functional.l1_loss(pred, z)
    cos = torch.nn.functional.cosine_similarity(pred, z, dim=-1).mean()
    return mse + l1 - options.cosine_weight * cos


def train_l2s(x: torch.Tensor, z: torch.Tensor, options: L2STrainOptions = L2STrainOptions()) -> L2SFit:
    if x.dim() != 2 or z.dim() != 2 or x.shape != z.shape:
        raise SteeringError(f"L2S needs inputs and targets of the same shape [N, d], got {tuple(x.shape)} "
                            f"and {tuple(z.shape)}", field="targets")
    n, d = x.shape
    if n < 4:
        raise SteeringError(f"L2S needs at least 4 training prompts, got {n}", field="data")
    x, z = x.float(), z.float()
    gen = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(n, generator=gen)
    num_val = max(1, int(round(n * options.val_fraction)))
    val, train = order[:num_val], order[num_val:]
    width = min(options.width, d)

    torch.manual_seed(options.seed)
    encoder = torch.nn.Linear(d, width)
    decoder = torch.nn.Linear(width, d, bias=False)
    centred = z[train] - z[train].mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    init = torch.zeros(width, d)
    init[: min(width, vh.shape[0])] = vh[:width]
    with torch.no_grad():
        decoder.weight.copy_(init.T)
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=options.lr)

    def forward(inputs):
        return decoder(torch.tanh(encoder(inputs)))

    best = (float("inf"), None, 0)
    history = []
    since_best = 0
    for epoch in range(options.epochs):
        perm = train[torch.randperm(train.numel(), generator=gen)]
        for start in range(0, perm.numel(), options.batch_size):
            idx = perm[start : start + options.batch_size]
            optimizer.zero_grad()
            _loss(forward(x[idx]), z[idx], options).backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = float(_loss(forward(x[val]), z[val], options))
        history.append(val_loss)
        if val_loss < best[0]:
            best = (val_loss, [p.detach().clone() for p in params], epoch)
            since_best = 0
        else:
            since_best += 1
            if since_best >= options.patience:
                break
    w_in, b_in, w_out = best[1]
    fit = L2SFit(w_in=w_in, b_in=b_in, w_out=w_out, mean=z[train].mean(0))
    with torch.no_grad():
        pred = fit.predict(x[val])
        cos = float(torch.nn.functional.cosine_similarity(pred, z[val], dim=-1).mean())
        mean_cos = float(torch.nn.functional.cosine_similarity(fit.mean.expand_as(z[val]), z[val], dim=-1).mean())
    fit.record = {
        "options": options.__dict__ | {"width": width},
        "num_train": int(train.numel()), "num_val": int(num_val),
        "best_epoch": best[2], "epochs_run": len(history), "val_loss": history,
        "val_cosine": cos, "val_cosine_mean_s": mean_cos,
    }
    return fit
