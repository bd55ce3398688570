"""Per-head linear probes: one L2-regularised logistic regression per (layer, head), fitted jointly.

Objective, per head, the same as scikit-learn's ``LogisticRegression(C=c)`` (penalty "l2", with an
intercept that is not penalised), so results are comparable::

    minimise over (w, b):   sum_i [ log(1 + exp(z_i)) - y_i z_i ]  +  ||w||^2 / (2 C),   z_i = w.x_i + b

``l2_grid`` therefore lists values of sklearn's ``C`` (inverse strength: larger C = weaker penalty).

Solver: Newton's method with a backtracking (Armijo) line search, batched over heads (chunks of
about ``_CHUNK_BYTES`` of features). Each head's (D+1)x(D+1) Hessian comes from one batched matmul
and is solved by a batched Cholesky; a head reuses its Hessian while the steps keep converging fast,
so most iterations cost just two passes over the features (gradient, logits of the step). Each
head's features are centred and scaled to unit variance first; that is only a change of variables
(the penalty becomes ||v/s||^2/(2C) on the scaled weights v), so the optimum is the raw-feature
optimum above, and the returned ``weight``/``bias`` act on raw activations. The grid is solved from
the smallest C up, each solve warm-started from the last.
Stopping rule: Newton decrement lambda^2/2 <= tol * (1 + objective), i.e. the objective is within
about that relative amount of its minimum (far tighter than sklearn's default tol).

Choosing C: ``selection="global"`` (default) keeps the one C with the highest mean validation
accuracy over all heads; ``"per_head"`` keeps, for each head, the C with its highest validation
accuracy (a little more optimistic, since the same validation set then ranks the heads). Ties go to
the smaller C (stronger regularisation).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_steer.errors import SteeringError

DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)

# Heads are fitted in chunks whose standardised train+val features take about this many bytes
# (peak memory is roughly twice it: a Hessian refresh makes a weighted copy).
_CHUNK_BYTES = 512 * 2**20
# A head keeps its Hessian while each step shrinks the Newton decrement at least this much.
_KEEP_HESSIAN_CONTRACTION = 0.01


@dataclass(frozen=True, eq=False)
class HeadProbes:
    """Fitted probes for every (layer, head); ``P(label 1 | a) = sigmoid(weight[l, h] . a + bias[l, h])``."""

    weight: torch.Tensor  # [L, H, D] float32, acts on raw head activations
    bias: torch.Tensor  # [L, H] float32
    val_accuracy: torch.Tensor  # [L, H] at the chosen C
    train_accuracy: torch.Tensor  # [L, H] at the chosen C
    c: torch.Tensor  # [L, H] float64: the chosen sklearn C (penalty ||w||^2 / (2C)) per head
    c_grid: tuple[float, ...]  # the C values tried, ascending
    val_accuracy_by_c: torch.Tensor  # [len(c_grid), L, H]
    train_idx: torch.Tensor  # int64 example indices the probes were fitted on
    val_idx: torch.Tensor  # int64 example indices they were validated on

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_heads(self) -> int:
        return self.weight.shape[1]

    @property
    def head_dim(self) -> int:
        return self.weight.shape[2]

    def top_k(self, k: int) -> list[tuple[int, int]]:
        """The k heads with the highest validation accuracy, best first; ties by (layer, head)."""
        total = self.num_layers * self.num_heads
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
        acc = self.val_accuracy.reshape(-1).tolist()
        order = sorted(range(total), key=lambda i: (-acc[i], i))  # flat index i = layer * H + head
        return [divmod(i, self.num_heads) for i in order[:k]]

    def probability(self, features_of_head: torch.Tensor, layer: int, head: int) -> torch.Tensor:
        """P(label 1) for activations ``[..., D]`` of head (layer, head)."""
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
            raise IndexError(f"(layer, head) = ({layer}, {head}) is outside [{self.num_layers}, {self.num_heads}]")
        if features_of_head.shape[-1] != self.head_dim:
            raise ValueError(f"features_of_head must end in head_dim {self.head_dim}, got {tuple(features_of_head.shape)}")
        logits = features_of_head.to(torch.float32) @ self.weight[layer, head] + self.bias[layer, head]
        return torch.sigmoid(logits)


def train_head_probes(
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    train_idx: torch.Tensor | Sequence[int],
    val_idx: torch.Tensor | Sequence[int],
    *,
    l2_grid: Sequence[float] = DEFAULT_C_GRID,
    max_iter: int = 200,
    seed: int = 0,
    progress: bool = True,
    selection: Literal["global", "per_head"] = "global",
    tol: float = 1e-7,
    num_threads: int | None = None,
) -> HeadProbes:
    """Fit one logistic-regression probe per (layer, head) on ``features[train_idx]``.

    ``features`` is ``[N, L, H, D]`` per-head activations (any float dtype; computed in float32),
    ``labels`` ``[N]`` 0/1. ``l2_grid`` holds sklearn ``C`` values; see the module docstring for the
    objective, solver and how C is chosen. ``max_iter`` caps Newton steps per C (it typically needs
    5-15). The solver is deterministic (zero start, exact Newton steps); ``seed`` does not change the
    result and is accepted so one seed can be passed through a fitting pipeline.

    ``num_threads``: torch intra-op threads while fitting (restored afterwards). ``None`` uses
    torch's current count capped by the idle cores (``os.cpu_count()`` minus the 1-minute load
    average, at least 1): with cores busy elsewhere, extra threads make every op wait for a thread
    that is not scheduled (measured 4x slower with 2 threads than 1 on a loaded 2-core machine).
    """
    del seed  # deterministic solver
    if selection not in ("global", "per_head"):
        raise ValueError(f"selection must be 'global' or 'per_head', got {selection!r}")
    if features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor [N, L, H, D], got {features.dtype} {tuple(features.shape)}")
    n, num_layers, num_heads, head_dim = features.shape
    y_all = _as_labels(labels, n)
    train = _as_index(train_idx, n, "train_idx")
    val = _as_index(val_idx, n, "val_idx")
    if torch.isin(train, val).any():
        raise ValueError("train_idx and val_idx overlap")
    y_train, y_val = y_all[train], y_all[val]
    if y_train.min() == y_train.max():
        raise SteeringError(
            f"the training split has only label {int(y_train[0])}; probes need both classes", field="labels"
        )
    grid = tuple(sorted({float(c) for c in l2_grid}))
    if not grid or grid[0] <= 0:
        raise ValueError(f"l2_grid must hold positive C values, got {tuple(l2_grid)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    heads = num_layers * num_heads
    flat = features.reshape(n, heads, head_dim)
    with _threads(num_threads):
        weights, biases, train_acc, val_acc = _fit_grid(
            flat, train, val, y_train, y_val, grid, max_iter=max_iter, tol=tol, progress=progress
        )

    if selection == "global":
        best = int(_first_argmax(val_acc.mean(dim=1, keepdim=True))[0])  # ties: smallest C
        pick = torch.full((heads,), best, dtype=torch.long)
    else:
        pick = _first_argmax(val_acc)
    rows = torch.arange(heads)
    shape = (num_layers, num_heads)
    return HeadProbes(
        weight=weights[pick, rows].reshape(num_layers, num_heads, head_dim).contiguous(),
        bias=biases[pick, rows].reshape(shape).contiguous(),
        val_accuracy=val_acc[pick, rows].reshape(shape).contiguous(),
        train_accuracy=train_acc[pick, rows].reshape(shape).contiguous(),
        c=torch.tensor(grid, dtype=torch.float64)[pick].reshape(shape),
        c_grid=grid,
        val_accuracy_by_c=val_acc.reshape(len(grid), *shape),
        train_idx=train,
        val_idx=val,
    )


def _fit_grid(flat, train, val, y_train, y_val, grid, *, max_iter, tol, progress):
    """Solve every head ([N, heads, D] view) for every C, a chunk of heads at a time.

    Returns (weight [G, heads, D], bias [G, heads], train accuracy [G, heads], val accuracy [G, heads]).
    """
    n, heads, head_dim = flat.shape
    per_head_bytes = (len(train) + len(val)) * (head_dim + 1) * 4
    chunk = max(1, min(heads, _CHUNK_BYTES // per_head_bytes))
    weights = torch.empty(len(grid), heads, head_dim, dtype=torch.float32)
    biases = torch.empty(len(grid), heads, dtype=torch.float32)
    train_acc = torch.empty(len(grid), heads, dtype=torch.float32)
    val_acc = torch.empty(len(grid), heads, dtype=torch.float32)
    unconverged = 0
    bar = tqdm(total=len(grid) * -(-heads // chunk), desc="probes", unit="fit", disable=not progress)
    for start in range(0, heads, chunk):
        stop = min(start + chunk, heads)
        x_train = _head_major(flat[:, start:stop], train)
        x_val = _head_major(flat[:, start:stop], val)
        solver = _BatchedLogisticNewton(x_train, y_train, max_iter=max_iter, tol=tol)
        del x_train
        for g, c in enumerate(grid):
            steps, not_done = solver.solve(c)
            unconverged += not_done
            w, b = solver.raw_weights()
            weights[g, start:stop], biases[g, start:stop] = w, b
            train_acc[g, start:stop] = solver.train_accuracy()
            val_acc[g, start:stop] = _accuracy(x_val, y_val, w, b)
            bar.update(1)
            bar.set_postfix(C=c, newton_steps=steps)
        del solver, x_val
    bar.close()
    if unconverged:
        warnings.warn(
            f"{unconverged} probe fit(s) (head x C) did not converge in {max_iter} Newton steps", stacklevel=3
        )
    return weights, biases, train_acc, val_acc


class _BatchedLogisticNewton:
    """B independent L2 logistic regressions on standardised features, solved by batched Newton.

    Forming the (D+1)^2 Hessians is the dominant cost (B * n * D^2), so a head keeps its Hessian
    (data part; the penalty is added per C) while the steps it gives contract well, and refreshes it
    when a step needed damping or the Newton decrement shrank by less than 100x. Convergence is only
    declared with a Hessian computed during the current C's solve. Line searches reuse the logits'
    direction ``design @ direction`` and cost no pass over the features.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, max_iter: int, tol: float) -> None:
        # x: [B, n, D] raw float32 (head-major), y: [n] float32 0/1
        batch, n, dim = x.shape
        self.mean = x.mean(dim=1)  # [B, D]
        self.design = torch.empty(batch, n, dim + 1, dtype=torch.float32)  # [(x - mean) / scale | 1]
        centred = self.design[..., :dim]
        torch.sub(x, self.mean[:, None, :], out=centred)
        scale = torch.linalg.vector_norm(centred, dim=1) / n**0.5  # population std
        if not (torch.isfinite(self.mean).all() and torch.isfinite(scale).all()):
            raise SteeringError("features contain NaN or inf", field="features")
        constant = scale <= 1e-6 * self.mean.abs() + 1e-30  # a constant feature (up to rounding)
        self.scale = torch.where(constant, torch.ones_like(scale), scale)
        centred.div_(self.scale[:, None, :])
        centred.masked_fill_(constant[:, None, :], 0.0)
        self.design[..., dim] = 1.0
        self.y = y.to(torch.float32)
        self.theta = torch.zeros(batch, dim + 1, dtype=torch.float64)  # [v | b] in standardised coordinates
        self.inv_scale_sq = 1.0 / self.scale.double() ** 2  # [B, D]
        self.hess_data = torch.zeros(batch, dim + 1, dim + 1, dtype=torch.float64)
        self.has_hess = False
        self.max_iter, self.tol = max_iter, tol

    def solve(self, c: float) -> tuple[int, int]:
        """Minimise for this C from the current theta. Returns (iterations, heads not converged).

        Passes over the features (gradient, logit step) run on every head, converged or not: a pass
        costs the same as copying out the unconverged heads would. Converged heads take step 0.
        """
        batch = self.theta.shape[0]
        design = self.design
        penalty = F.pad(self.inv_scale_sq / c, (0, 1))  # intercept not penalised: [B, D+1]
        logits = _rowwise_matvec(design, self.theta)  # [B, n]
        chol = _cholesky(_with_diagonal(self.hess_data, penalty)) if self.has_hess else None
        fresh = torch.zeros(batch, dtype=torch.bool)  # Hessian computed during this solve
        prev_decrement = torch.full((batch,), float("inf"), dtype=torch.float64)
        prev_full_step = torch.ones(batch, dtype=torch.bool)
        active = torch.ones(batch, dtype=torch.bool)
        iteration = 0
        for iteration in range(1, self.max_iter + 1):
            theta = self.theta
            p = torch.sigmoid(logits)
            objective = (F.softplus(logits) - self.y * logits).sum(dim=1, dtype=torch.float64)
            objective += 0.5 * (penalty * theta**2).sum(dim=1)
            grad = torch.bmm((p - self.y)[:, None, :], design)[:, 0].double() + penalty * theta
            threshold = 2.0 * self.tol * (1.0 + objective.abs())

            if chol is None:
                chol = torch.empty_like(self.hess_data)
                refresh = active.clone()
                direction = torch.zeros_like(grad)
                decrement = torch.zeros_like(objective)
            else:
                direction = _cholesky_solve(grad, chol)
                decrement = (grad * direction).sum(dim=1)
                refresh = active & (
                    ~prev_full_step
                    | (decrement > _KEEP_HESSIAN_CONTRACTION * prev_decrement)
                    | ((decrement <= threshold) & ~fresh)
                )
            if refresh.any():
                rows = refresh.nonzero()[:, 0]
                root_weights = (p[rows] * (1.0 - p[rows])).sqrt_()[..., None]
                if len(rows) == batch:
                    scaled = design * root_weights
                else:
                    scaled = design.index_select(0, rows).mul_(root_weights)
                hess = torch.bmm(scaled.transpose(1, 2), scaled).double()
                del scaled
                self.hess_data[rows] = hess
                chol[rows] = _cholesky(_with_diagonal(hess, penalty[rows]))
                fresh[rows] = True
                direction[rows] = _cholesky_solve(grad[rows], chol[rows])
                decrement[rows] = (grad[rows] * direction[rows]).sum(dim=1)
            self.has_hess = True

            converged = active & (decrement <= threshold)
            searching = active & ~converged
            logit_step = _rowwise_matvec(design, direction)
            step = converged.to(torch.float64)  # converged heads take the full (tiny) step, inactive none
            if searching.any():
                rows = searching.nonzero()[:, 0]
                step[rows] = self._line_search(
                    logits[rows], logit_step[rows], theta[rows], direction[rows], penalty[rows],
                    objective[rows], decrement[rows],
                )
            self.theta = theta - step[:, None] * direction
            logits = logits - step.to(torch.float32)[:, None] * logit_step
            prev_decrement = torch.where(active, decrement, prev_decrement)
            prev_full_step = step == 1.0
            active &= ~converged
            if not active.any():
                return iteration, 0
        return iteration, int(active.sum())

    def _line_search(self, logits, logit_step, theta, direction, penalty, objective, decrement) -> torch.Tensor:
        """Step sizes 1, 1/2, 1/4, ... until Armijo holds; logits along the ray cost no feature pass.

        Float32 logits make the objective noisy at the ~1e-6 relative level, so that much slack is allowed.
        """
        step = torch.ones_like(objective)
        pending = torch.ones_like(objective, dtype=torch.bool)
        slack = 1e-6 * (1.0 + objective.abs())
        for _ in range(40):
            rows = pending.nonzero()[:, 0]
            if len(rows) == 0:
                break
            t = step[rows]
            trial_logits = logits[rows] - t.to(torch.float32)[:, None] * logit_step[rows]
            trial_theta = theta[rows] - t[:, None] * direction[rows]
            value = (F.softplus(trial_logits) - self.y * trial_logits).sum(dim=1, dtype=torch.float64)
            value += 0.5 * (penalty[rows] * trial_theta**2).sum(dim=1)
            ok = value <= objective[rows] - 1e-4 * t * decrement[rows] + slack[rows]
            pending[rows[ok]] = False
            step[rows[~ok]] *= 0.5
        return step

    def raw_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [B, D], bias [B]) acting on raw features: w = v / s, b = b' - w . mean."""
        w = self.theta[:, :-1] / self.scale.double()
        b = self.theta[:, -1] - (w * self.mean.double()).sum(dim=1)
        return w.to(torch.float32), b.to(torch.float32)

    def train_accuracy(self) -> torch.Tensor:
        z = _rowwise_matvec(self.design, self.theta)
        return ((z > 0).to(torch.float32) == self.y).to(torch.float32).mean(dim=1)


def _rowwise_matvec(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[B, n, k] @ [B, k] -> [B, n] in float32 (as (v^T M^T): MKL's batched gemv is ~2.5x slower)."""
    return torch.bmm(vectors.to(torch.float32)[:, None, :], matrices.transpose(1, 2))[:, 0]


def _with_diagonal(matrices: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    out = matrices.clone()
    out.diagonal(dim1=1, dim2=2).add_(diagonal)
    return out


@contextmanager
def _threads(num_threads: int | None):
    """Set torch's intra-op thread count for a block (see ``train_head_probes``), then restore it."""
    before = torch.get_num_threads()
    if num_threads is None:
        try:
            idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        except OSError:  # no load average on this platform
            idle = before
        num_threads = max(1, min(before, idle))
    elif num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _one_thread():
    """Run small LAPACK calls on one thread.

    Threaded Cholesky of many small (D+1)^2 matrices synchronises its threads per block; on a busy
    machine each wait costs a scheduler slice, making it ~100x slower than one thread (measured:
    0.12 s vs 0.0002 s per 129x129 matrix on a loaded 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cholesky_solve(rhs: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return torch.cholesky_solve(rhs[..., None], chol)[..., 0]


def _cholesky(hess: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factor of symmetric positive (semi)definite matrices, adding jitter if needed."""
    with _one_thread():
        chol, info = torch.linalg.cholesky_ex(hess)
        jitter = 1e-10
        while bool((info != 0).any()):
            if jitter > 1.0:
                raise SteeringError("probe Hessian is not positive definite (features degenerate?)", field="features")
            bad = (info != 0).nonzero()[:, 0]
            scale = hess[bad].diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1.0)
            eye = torch.eye(hess.shape[-1], dtype=hess.dtype)
            chol[bad], info[bad] = torch.linalg.cholesky_ex(hess[bad] + (jitter * scale)[:, None, None] * eye)
            jitter *= 100.0
    return chol


def _head_major(flat_chunk: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[N, B, D] (a view) -> the selected rows as contiguous float32 [B, n, D]."""
    return flat_chunk.index_select(0, rows).to(torch.float32).transpose(0, 1).contiguous()


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = _rowwise_matvec(x, w) + b[:, None]
    return ((z > 0).to(torch.float32) == y).to(torch.float32).mean(dim=1)


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 0 (torch.argmax does not promise which maximum)."""
    best = values.max(dim=0, keepdim=True).values
    positions = torch.arange(values.shape[0])[:, None].expand_as(values)
    return torch.where(values == best, positions, values.shape[0]).min(dim=0).values


def _as_labels(labels: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise SteeringError("labels must be 0 or 1", field="labels")
    return y.to(torch.float32)


def _as_index(idx: torch.Tensor | Sequence[int], n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if len(t) == 0:
        raise ValueError(f"{name} is empty")
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise IndexError(f"{name} has indices outside [0, {n})")
    if len(torch.unique(t)) != len(t):
        raise ValueError(f"{name} repeats indices")
    return t
