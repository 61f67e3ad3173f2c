"""Optimisation tasks for meta-training and evaluating learned optimisers.

Every task works on a flat parameter vector so one learned optimiser serves all of them:
``task.initial_params() -> [N]`` and ``task.loss(params[N], step) -> []``. The loss is a pure
function of ``(params, step)``: minibatch tasks draw their batch from a generator seeded by
``(task seed, step)``, so a trajectory can be replayed exactly (state-dict round trips, resumed
meta-training, causality tests).

Families (Andrychowicz et al. 2016; Metz et al. 2020; Jain et al. 2023 "Mnemosyne"):

- :class:`QuadraticTask`    ``f(x) = |A x - b|^2 / (2 n)`` with a random, moderately conditioned A.
- :class:`RastriginTask`    ``f(x) = (1/d) sum_i [ (x_i - s_i)^2 + a (1 - cos(2 pi (x_i - s_i))) ]``,
  many local minima, global minimum 0 at ``x = s``.
- :class:`MLPRegressionTask` a small tanh MLP fitted (MSE) to a random teacher MLP, minibatches.
- :class:`DigitsMLPTask`    a small MLP classifier on scikit-learn's 8x8 digits (offline image
  default), cross-entropy on minibatches; evaluation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "Task",
    "QuadraticTask",
    "RastriginTask",
    "MLPRegressionTask",
    "DigitsMLPTask",
    "TaskDistributionConfig",
    "sample_task",
    "rastrigin",
]


class Task:
    """A differentiable objective on a flat parameter vector.

    Subclasses set ``num_params`` and implement :meth:`initial_params` and :meth:`loss`.
    """

    name: str = "task"
    num_params: int

    def initial_params(self) -> torch.Tensor:  # [N]
        raise NotImplementedError

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:  # params [N] -> []
        raise NotImplementedError


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(seed) % (2**63 - 1))
    return gen


def rastrigin(x: torch.Tensor, *, shift: torch.Tensor, amplitude: float) -> torch.Tensor:
    """Shifted Rastrigin function, averaged over coordinates.

    ``f(x) = (1/d) sum_i [ (x_i - s_i)^2 + a (1 - cos(2 pi (x_i - s_i))) ]``; ``f >= 0``, ``f(s) = 0``.

    Shapes: ``x [..., d]``, ``shift [d]`` -> ``[...]``.
    """
    z = x - shift
    return (z.square() + amplitude * (1.0 - torch.cos(2.0 * math.pi * z))).mean(dim=-1)


class RastriginTask(Task):
    """Shifted Rastrigin-type function in ``dim`` dimensions (see :func:`rastrigin`).

    Args:
        dim: number of coordinates d.
        seed: draws the shift ``s ~ U(-2, 2)^d``, the amplitude ``a ~ U(amplitude_range)`` and
            the start ``x0 ~ U(-init_radius, init_radius)^d``.
    """

    name = "rastrigin"

    def __init__(
        self,
        dim: int,
        *,
        seed: int,
        amplitude_range: tuple[float, float] = (1.0, 10.0),
        init_radius: float = 5.12,
    ):
        if dim < 1:
            raise ValueError(f"RastriginTask: dim must be >= 1, got {dim}")
        lo, hi = amplitude_range
        if not 0.0 <= lo <= hi:
            raise ValueError(f"RastriginTask: amplitude_range must be 0 <= lo <= hi, got {amplitude_range}")
        gen = _generator(seed)
        self.dim = dim
        self.num_params = dim
        self.shift = torch.rand(dim, generator=gen) * 4.0 - 2.0
        self.amplitude = float(lo + (hi - lo) * torch.rand((), generator=gen))
        self._x0 = (torch.rand(dim, generator=gen) * 2.0 - 1.0) * init_radius

    def initial_params(self) -> torch.Tensor:
        return self._x0.clone()

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:
        return rastrigin(params, shift=self.shift.to(params), amplitude=self.amplitude)


class QuadraticTask(Task):
    """``f(x) = |A x - b|^2 / (2 n)``, ``A = U diag(sv) V^T`` with log-uniform singular values.

    Args:
        dim: number of parameters.
        seed: draws A (condition number up to ``max_condition``), b and x0 ~ N(0, I).
    """

    name = "quadratic"

    def __init__(self, dim: int, *, seed: int, max_condition: float = 30.0):
        if dim < 1:
            raise ValueError(f"QuadraticTask: dim must be >= 1, got {dim}")
        if max_condition < 1.0:
            raise ValueError(f"QuadraticTask: max_condition must be >= 1, got {max_condition}")
        gen = _generator(seed)
        self.dim = dim
        self.num_params = dim
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
        log_sv = torch.rand(dim, generator=gen) * math.log(max_condition)
        self.matrix = u @ torch.diag(torch.exp(log_sv) / max_condition**0.5) @ v.T
        self.target = torch.randn(dim, generator=gen)
        self._x0 = torch.randn(dim, generator=gen)

    def initial_params(self) -> torch.Tensor:
        return self._x0.clone()

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:
        residual = self.matrix.to(params) @ params - self.target.to(params)  # [n]
        return 0.5 * residual.square().mean()


def _mlp_shapes(sizes: list[int]) -> list[tuple[int, int]]:
    return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]


def _mlp_num_params(sizes: list[int]) -> int:
    return sum(o * i + o for o, i in _mlp_shapes(sizes))


def _mlp_apply(params: torch.Tensor, x: torch.Tensor, sizes: list[int], activation) -> torch.Tensor:
    """Run an MLP whose weights and biases are packed (layer by layer, W then b) in ``params``.

    Shapes: ``params [N]``, ``x [B, sizes[0]]`` -> ``[B, sizes[-1]]``.
    """
    offset = 0
    shapes = _mlp_shapes(sizes)
    for k, (out_dim, in_dim) in enumerate(shapes):
        w = params[offset : offset + out_dim * in_dim].view(out_dim, in_dim)
        offset += out_dim * in_dim
        b = params[offset : offset + out_dim]
        offset += out_dim
        x = F.linear(x, w, b)
        if k < len(shapes) - 1:
            x = activation(x)
    return x


def _mlp_init(sizes: list[int], gen: torch.Generator) -> torch.Tensor:
    """LeCun-normal weights, zero biases, packed like :func:`_mlp_apply` expects."""
    chunks = []
    for out_dim, in_dim in _mlp_shapes(sizes):
        chunks.append((torch.randn(out_dim, in_dim, generator=gen) / in_dim**0.5).flatten())
        chunks.append(torch.zeros(out_dim))
    return torch.cat(chunks)


class MLPRegressionTask(Task):
    """Fit a tanh MLP ``in -> hidden -> 1`` to a random teacher MLP (MSE on minibatches).

    Args:
        in_dim, hidden: student sizes; the teacher is ``in -> 2*hidden -> 1``.
        seed: draws teacher, data (``num_samples`` points), student init and the batch stream.
        batch_size: minibatch size; the batch at step t is drawn with seed ``(seed, t)``.
    """

    name = "mlp"

    def __init__(
        self,
        *,
        in_dim: int = 4,
        hidden: int = 8,
        seed: int,
        num_samples: int = 256,
        batch_size: int = 32,
        noise: float = 0.05,
    ):
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"MLPRegressionTask: in_dim and hidden must be >= 1, got {in_dim}, {hidden}")
        if not 1 <= batch_size <= num_samples:
            raise ValueError(
                f"MLPRegressionTask: batch_size must be in [1, num_samples={num_samples}], got {batch_size}"
            )
        gen = _generator(seed)
        self.seed = int(seed)
        self.sizes = [in_dim, hidden, 1]
        teacher_sizes = [in_dim, 2 * hidden, 1]
        teacher = _mlp_init(teacher_sizes, gen)
        self.inputs = torch.randn(num_samples, in_dim, generator=gen)
        with torch.no_grad():
            y = _mlp_apply(teacher, self.inputs, teacher_sizes, torch.tanh)
        self.targets = (y + noise * torch.randn(y.shape, generator=gen)).squeeze(-1)
        self.num_params = _mlp_num_params(self.sizes)
        self._x0 = _mlp_init(self.sizes, gen)
        self.batch_size = batch_size

    def initial_params(self) -> torch.Tensor:
        return self._x0.clone()

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:
        gen = _generator(self.seed * 1_000_003 + step)
        idx = torch.randint(0, self.inputs.shape[0], (self.batch_size,), generator=gen)
        pred = _mlp_apply(params, self.inputs[idx].to(params), self.sizes, torch.tanh).squeeze(-1)
        return F.mse_loss(pred, self.targets[idx].to(params))


class DigitsMLPTask(Task):
    """A ``64 -> hidden -> 10`` ReLU MLP on scikit-learn's 8x8 digits (pixels scaled to [0, 1]).

    The 1,797 images are split (fixed permutation, ``seed``) into 1,437 train and 360 test images.
    :meth:`loss` is the cross-entropy of a training minibatch; :meth:`test_metrics` gives the
    full-test-set loss and accuracy.
    """

    name = "digits"

    def __init__(self, *, hidden: int = 32, seed: int = 0, batch_size: int = 64):
        try:
            from sklearn.datasets import load_digits
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "DigitsMLPTask needs scikit-learn (it ships the 8x8 digits); install scikit-learn or skip "
                "the digits evaluation (flt-mol optim evaluate --digits-steps 0)"
            ) from err

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(x.shape[0], generator=_generator(12345))
        n_test = 360
        self.test_x, self.test_y = x[perm[:n_test]], y[perm[:n_test]]
        self.train_x, self.train_y = x[perm[n_test:]], y[perm[n_test:]]
        if not 1 <= batch_size <= self.train_x.shape[0]:
            raise ValueError(f"DigitsMLPTask: batch_size must be in [1, {self.train_x.shape[0]}], got {batch_size}")
        self.sizes = [64, hidden, 10]
        self.seed = int(seed)
        self.batch_size = batch_size
        self.num_params = _mlp_num_params(self.sizes)
        self._x0 = _mlp_init(self.sizes, _generator(seed))

    def initial_params(self) -> torch.Tensor:
        return self._x0.clone()

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:
        gen = _generator(self.seed * 1_000_003 + step)
        idx = torch.randint(0, self.train_x.shape[0], (self.batch_size,), generator=gen)
        logits = _mlp_apply(params, self.train_x[idx].to(params), self.sizes, torch.relu)
        return F.cross_entropy(logits, self.train_y[idx])

    @torch.no_grad()
    def test_metrics(self, params: torch.Tensor) -> dict[str, float]:
        logits = _mlp_apply(params, self.test_x.to(params), self.sizes, torch.relu)
        return {
            "test_loss": float(F.cross_entropy(logits, self.test_y)),
            "test_accuracy": float((logits.argmax(-1) == self.test_y).float().mean()),
        }


TASK_KINDS = ("quadratic", "rastrigin", "mlp")


@dataclass
class TaskDistributionConfig:
    """The meta-training task distribution.

    Attributes:
        kinds: task families to sample uniformly from (``quadratic``, ``rastrigin``, ``mlp``).
        dims: inclusive range of dimensions for quadratic / Rastrigin tasks.
        rastrigin_amplitude: inclusive range of the Rastrigin amplitude ``a``.
        mlp_in_dim, mlp_hidden, mlp_batch_size: sizes of the MLP regression tasks.
    """

    kinds: list[str] = field(default_factory=lambda: ["quadratic", "rastrigin", "mlp"])
    dims: tuple[int, int] = (2, 10)
    rastrigin_amplitude: tuple[float, float] = (1.0, 10.0)
    mlp_in_dim: int = 4
    mlp_hidden: int = 8
    mlp_batch_size: int = 32

    def __post_init__(self):
        if not self.kinds:
            raise ValueError("TaskDistributionConfig.kinds must name at least one task family")
        for kind in self.kinds:
            if kind not in TASK_KINDS:
                raise ValueError(f"TaskDistributionConfig.kinds: unknown task {kind!r}; expected one of {TASK_KINDS}")
        self.dims = tuple(int(d) for d in self.dims)
        self.rastrigin_amplitude = tuple(float(a) for a in self.rastrigin_amplitude)
        if len(self.dims) != 2 or not 1 <= self.dims[0] <= self.dims[1]:
            raise ValueError(f"TaskDistributionConfig.dims must be [lo, hi] with 1 <= lo <= hi, got {self.dims}")


def sample_task(config: TaskDistributionConfig, seed: int) -> Task:
    """Draw one task from the distribution; deterministic in ``seed``."""
    gen = _generator(seed)
    kind = config.kinds[int(torch.randint(0, len(config.kinds), (), generator=gen))]
    dim = int(torch.randint(config.dims[0], config.dims[1] + 1, (), generator=gen))
    task_seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    if kind == "quadratic":
        return QuadraticTask(dim, seed=task_seed)
    if kind == "rastrigin":
        return RastriginTask(dim, seed=task_seed, amplitude_range=config.rastrigin_amplitude)
    return MLPRegressionTask(
        in_dim=config.mlp_in_dim, hidden=config.mlp_hidden, seed=task_seed, batch_size=config.mlp_batch_size
    )
