"""Properties of the distillation losses (compress.distill): zero at equality, the closed-form
gradient, chunked == unchunked, masks, the teacher top-k, a sharded vocabulary, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from compress import distill

B, L, V = 2, 8, 24


def logits(seed, shape=(B, L, V), scale=3.0):
  return jax.device_put(np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale)


@pytest.mark.parametrize("kind", distill.KINDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_zero_when_student_equals_teacher(kind, temperature):
  z = logits(0)
  loss, weight = distill.kd_loss(z, z, temperature=temperature, kind=kind)
  assert abs(float(loss)) < 1e-5 and float(weight) == B * L
  other, _ = distill.kd_loss(z, logits(1), temperature=temperature, kind=kind)
  assert float(other) > 0.1


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_kd_gradient_is_the_closed_form(temperature):
  """d/dz of KL(softmax(v/T) || softmax(z/T)) = (1/T)(softmax(z/T) - softmax(v/T))."""
  z, v = logits(0), logits(1)
  grad = jax.grad(lambda z: distill.kd_loss(z, v, temperature=temperature)[0])(z)
  expected = (jax.nn.softmax(z / temperature) - jax.nn.softmax(v / temperature)) / temperature
  np.testing.assert_allclose(grad / temperature**2, expected, atol=1e-6)


@pytest.mark.parametrize("kind", distill.KINDS)
def test_chunked_equals_unchunked(kind):
  z, v = logits(2), logits(3)
  mask = jnp.asarray(np.random.RandomState(4).rand(B, L) > 0.3, jnp.float32)

  def f(z, chunk):
    return distill.kd_loss(z, v, mask, temperature=2.0, kind=kind, chunk=chunk)[0]

  np.testing.assert_allclose(f(z, 2), f(z, None), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(z, 2), jax.grad(f)(z, None), atol=1e-7)


def test_masked_tokens_have_no_effect():
  z, v = logits(5), logits(6)
  mask = jnp.asarray(np.arange(L) < 5, jnp.float32)[None].repeat(B, 0)
  z2 = z.at[:, 5:].set(logits(7)[:, 5:])  # change only the padding
  a, w = distill.kd_loss(z, v, mask)
  b, _ = distill.kd_loss(z2, v, mask, chunk=4)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(w) == B * 5
  grad = jax.grad(lambda z: distill.kd_loss(z, v, mask)[0])(z)
  assert not np.asarray(grad[:, 5:]).any()


def test_top_k_teacher_with_every_logit_equals_the_full_teacher():
  z, v = logits(8), logits(9)
  full, _ = distill.kd_loss(z, v, temperature=2.0)
  top, _ = distill.kd_loss(z, distill.teacher_top_k(v, V), temperature=2.0)
  np.testing.assert_allclose(top, full, rtol=1e-5)
  few, _ = distill.kd_loss(z, distill.teacher_top_k(v, 4), temperature=2.0, chunk=4)
  assert np.isfinite(float(few)) and float(few) != pytest.approx(float(full))


def test_vocab_sharded_over_tensor_equals_one_device():
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  shard = NamedSharding(mesh, P("data", None, "tensor"))
  z, v = logits(10), logits(11)
  f = jax.jit(jax.value_and_grad(lambda z, v: distill.kd_loss(z, v, temperature=2.0, chunk=4)[0]))
  loss, grad = f(z, v)
  loss_s, grad_s = f(jax.device_put(z, shard), jax.device_put(v, shard))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  np.testing.assert_allclose(grad_s, grad, atol=1e-6)


def test_jsd_is_symmetric_and_bounded():
  z, v = logits(12), logits(13)
  a, w = distill.kd_loss(z, v, kind="jsd")
  b, _ = distill.kd_loss(v, z, kind="jsd")
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert 0 < float(a) / float(w) <= np.log(2)


def test_hidden_and_attention_losses():
  hs = [logits(i, (B, L, 16)) for i in range(2)]
  ht = [logits(i, (B, L, 16)) for i in range(4)]
  for kind in ("mse", "cosine"):
    zero, w = distill.hidden_loss(hs, ht, {0: 0, 1: 1}, kind=kind)
    assert abs(float(zero)) < 1e-5 and float(w) == B * L
    assert float(distill.hidden_loss(hs, ht, {0: 2, 1: 3}, kind=kind)[0]) > 0.1
  proj = jnp.eye(16, 32)
  wide = [jnp.concatenate([h, jnp.zeros_like(h)], -1) for h in ht]
  assert abs(float(distill.hidden_loss(hs, wide, {1: 1}, projection=proj)[0])) < 1e-5
  p = jax.nn.softmax(logits(20, (B, 2, L, L)))
  assert abs(float(distill.attention_loss(p, p)[0])) < 1e-4
  assert float(distill.attention_loss(jax.nn.softmax(logits(21, (B, 2, L, L))), p)[0]) > 0.1
  assert distill.every_other_layer(12) == {i: 2 * i for i in range(6)}


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: distill.kd_loss(logits(0), logits(1), temperature=0.0), "temperature"),
    (lambda: distill.kd_loss(logits(0), logits(1), temperature=-1.0), "temperature"),
    (lambda: distill.kd_loss(logits(0), logits(1, (B, L, V + 8))), "vocabular"),
    (lambda: distill.kd_loss(logits(0), logits(1), kind="kl"), "kind"),
    (lambda: distill.kd_loss(logits(0), logits(1), chunk=3), "chunk"),
    (lambda: distill.hidden_loss([logits(0)], [logits(1)], {0: 4}), "past the models' depths"),
    (lambda: distill.every_other_layer(4, 3), "past the teacher's depth"),
  ],
)
def test_bad_input_is_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize("scan", [(False, False), (True, True), (False, True)], ids=str)
def test_student_init_copies_exactly_the_mapped_layers(scan):
  import flax.linen as nn

  import models

  def params(n_layers, scan_layers, seed):
    cfg = models.get_preset("tiny", n_layers=n_layers, scan_layers=scan_layers)
    shapes = jax.eval_shape(models.build(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.RandomState(seed)
    return jax.tree.map(
      lambda s: rng.randn(*s.shape).astype(np.float32), nn.unbox(shapes)["params"]
    )

  def layer(p, i):
    return jax.tree.map(lambda x: x[i], p["layers"]) if "layers" in p else p[f"layers_{i}"]

  teacher, student = params(4, scan[0], 0), params(3, scan[1], 1)
  layer_map = {0: 0, 1: 2}
  layers = models.structure().layers
  out = distill.init_from_teacher(student, teacher, layer_map, layers)
  assert jax.tree.structure(out) == jax.tree.structure(student)
  for s, t in layer_map.items():
    jax.tree.map(np.testing.assert_array_equal, layer(out, s), layer(teacher, t))
  jax.tree.map(np.testing.assert_array_equal, layer(out, 2), layer(student, 2))  # unmapped
  np.testing.assert_array_equal(out["embed"]["embedding"], teacher["embed"]["embedding"])
  with pytest.raises(ValueError, match="past the depth"):
    distill.init_from_teacher(student, teacher, {0: 4}, layers)
  with pytest.raises(ValueError, match="No layers under 'blocks'"):
    distill.init_from_teacher(student, teacher, layer_map, "blocks")
