"""The factorized model's hook: a dot_general factory that also lists the layers to factorize.

    choices = lowrank.plan(params, r"mlp/w./kernel$", energy=0.9, n_in=...)
    model = models.build(cfg, dot_general_cls=lowrank.FactorizedDot(lowrank.layer_ranks(choices)))

A model's dense layer whose path is in `ranks` holds `kernel_u` [*in, r] and `kernel_v`
[r, *out] instead of its kernel and computes (x u) v, each product through a dot_general of
`inner` (default lax.dot_general; a quantized one: QAT of both factors).
"""

import dataclasses

from jax import lax


@dataclasses.dataclass(frozen=True)
class FactorizedDot:
  """A dot_general factory carrying {layer path: rank} (`ranks`) for the model's layers."""

  layer_ranks: tuple = ()  # ((layer path, rank), ...), hashable like a module field must be
  inner: object = None  # the factory of the dots themselves (None: lax.dot_general)

  @property
  def ranks(self) -> dict:
    return dict(self.layer_ranks)

  def __call__(self):
    return lax.dot_general if self.inner is None else self.inner()


def layer_ranks(choices: dict) -> tuple:
  """((layer path, rank), ...) of a plan: the kernel paths without their "/kernel"."""
  return tuple((path.rsplit("/", 1)[0], c.rank) for path, c in sorted(choices.items()))
