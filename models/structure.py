"""Where things are in the models' parameter trees, as plain data for code that must not know
the names (compress/): regexes over "/"-joined parameter paths ("layers_0/attn/query/kernel")
and axis numbers. Axes are negative, so they hold for scanned layers too (one leading layer
axis). The shapes they describe are in models/transformer.py's docstring.

    s = models.structure(config)
    prune.parse_granularity("heads", heads=s.heads)
    prune.pruning(0.5, select=s.weights, stacked=f"^{s.layers}/")
    distill.init_from_teacher(student, teacher, layer_map, s.layers)
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Structure:
  """A parameter tree's layout as regexes over parameter paths and axis numbers."""

  # The layers: `{layers}_{i}` subtrees unscanned; one `{layers}` subtree scanned, every leaf
  # stacking the layers on axis 0.
  layers: str = "layers"
  weights: str = r"kernel$"  # weight matrices (attention, MLP, heads), not biases or norms
  embeddings: str = r"embedding$"  # lookup tables (the token table is also the tied LM head)
  # (regex, axes summed over to score one head): query/key/value [E, H|K, D], out [H, D, E].
  heads: tuple = (
    (r"attn/(query|key|value)/kernel$", (-3, -1)),
    (r"attn/out/kernel$", (-2, -1)),
  )
  # (regex, axes summed over to score one MLP neuron): wi, wg [E, F], wo [F, E].
  neurons: tuple = ((r"mlp/(wi|wg)/kernel$", (-2,)), (r"mlp/wo/kernel$", (-1,)))
  # (regex, input axis), first match wins: the axis along which N:M groups run. Embed for
  # query/key/value; head_dim for out [H, D, E]; the input of every [in, out] matrix.
  contracting: tuple = ((r"attn/(query|key|value)/kernel$", -3), (r".", -2))
  # (regex, n), first match wins: a kernel's n leading axes are its inputs (out [H, D, E]: 2).
  inputs: tuple = ((r"attn/out/kernel$", 2), (r".", 1))
  # (source, the kernels it alone feeds), paths inside one layer; pre-LN decoders only. A
  # per-input-channel scale s of those kernels (rows times s) moves exactly out of the source:
  # a norm (scale / s, bias / s) or a linear layer whose outputs enter them linearly (its
  # output columns / s). AWQ's and SmoothQuant's equivalent transformation.
  feeds: tuple = (
    (r"attn_norm", r"attn/(query|key|value)/kernel$"),
    (r"mlp_norm", r"mlp/(wi|wg)/kernel$"),
  )


def structure(mc=None) -> Structure:
  """The layout of the parameter trees `models.build(mc)` makes (every config shares it)."""
  del mc
  return Structure()


def feeds(mc) -> tuple:
  """`Structure.feeds` plus the linear sources the model `mc` allows: the value kernel into the
  attention output when every query head has its own value head, the MLP's input kernel into
  its output when that enters linearly (gated: act(x W_g) * (x W_i); or a ReLU)."""
  out = Structure.feeds
  if (mc.n_kv_heads or mc.n_heads) == mc.n_heads:
    out += (("attn/value", r"attn/out/kernel$"),)
  if mc.gated_mlp or mc.activation == "relu":
    out += (("mlp/wi", r"mlp/wo/kernel$"),)
  return out
