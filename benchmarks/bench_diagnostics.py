"""Cost of each diagnostics probe relative to one training step.

The model is the zoo's E1/E2 MLP, 784-6x256-10 with ReLU, with and without
a tfnorm BatchNormalization after every hidden Dense, trained with SGD at
learning rate 0.1 on a random float32 batch of 128 (sparse categorical
cross-entropy on logits). Timed, interleaved round-robin in one process
so machine noise hits every variant alike; each value is the median over
repeats of the mean time per call:

- `train_on_batch`: Keras's `model.train_on_batch(x, y)`;
- `train_step`: a `tf.function` doing forward, backward and the SGD update,
  without Keras's per-call overhead;
- `ics`: `internal_covariate_shift` over all 7 kernel layers (unrolled,
  the default for up to 8 shifted layers);
- `ics_looped`: the same with `unroll=False`;
- `ics_last`: the output layer only;
- `landscape`: `loss_landscape` with the default 8 step sizes;
- `landscape_2`: with 2 step sizes;
- `layer_stats`: `layer_statistics` (one forward pass and moments).

Column `first s` is the one-time cost of a probe's first call on a fresh
model (tracing and graph optimization), measured once.

The work is inherent to the definitions. A training step is one gradient
and an update. The landscape probe needs one gradient plus one per step
size (9 with the defaults), all over the whole network: no probe of the
8-point grid can cost less than about 9 gradients. ICS needs the model's
gradient plus, per layer i after the first, one at its own point; the
unrolled probe shares the forward pass through the moved layers and runs
each layer's pass through layers i..L only, about 2.8 gradients of work on
this MLP. The issue's target of 2x a training step per probe is therefore
out of reach for the landscape probe and for ICS of every layer; it holds
for `layer_stats` and for ICS of a few layers, and amortized over the
probing period for all (column `per_step@25`, the overhead per training
step when probing every 25 steps).

Measured on 2 idle CPU cores (full run, medians), x `train_on_batch`
without / with BN: ics 3.62 / 3.38, ics_looped 5.23 / 5.07, ics_last
1.62 / 1.78, landscape 6.57 / 6.29, landscape_2 2.79 / 2.67, layer_stats
0.88 / 1.08; per step when probing every 25 steps at most 0.26. On cores
shared with other jobs the ratios read lower (ics 2.1-2.7, landscape
4.3-6.7, an earlier measurement).

`--deep` adds the 25-layer deep linear net of the zoo's E2 arm (width 64,
with and without BN): ICS of its 25 layers unrolled and looped, per probe
and at the first call, the trade-off behind `unroll=None`.

Run (about 1 minute on 2 CPU cores with --quick, 4 without; --deep adds
about 2 minutes):

    python benchmarks/bench_diagnostics.py --quick
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 128
PERIOD = 25
TARGET = 2.0


def _build(bn, seed=0, hidden=(256,) * 6, activation="relu"):
    import keras

    import tfnorm

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((784,))]
    for units in hidden:
        layers.append(keras.layers.Dense(units))
        if bn:
            layers.append(tfnorm.BatchNormalization())
        layers.append(keras.layers.Activation(activation))
    layers.append(keras.layers.Dense(10))
    model = keras.Sequential(layers)
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _probes(model, x, y):
    """The probe variants of one model, as callables."""
    from tfnorm import diagnostics

    last = [layer.name for layer in model.layers if hasattr(layer, "kernel")]
    return {
        "ics": lambda: diagnostics.internal_covariate_shift(model, x, y),
        "ics_looped": lambda: diagnostics.internal_covariate_shift(
            model, x, y, unroll=False
        ),
        "ics_last": lambda: diagnostics.internal_covariate_shift(
            model, x, y, layers=last[-1:]
        ),
        "landscape": lambda: diagnostics.loss_landscape(model, x, y),
        "landscape_2": lambda: diagnostics.loss_landscape(
            model, x, y, step_sizes=[0.1, 0.4]
        ),
        "layer_stats": lambda: diagnostics.layer_statistics(model, x),
    }


def _variants(model, x, y):
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return {
        "train_on_batch": lambda: model.train_on_batch(x, y),
        "train_step": lambda: step(x, y).numpy(),
        **_probes(model, x, y),
    }


def _first_calls(build, x, y, names):
    """Seconds of each probe's first call, each on a fresh model."""
    first = {}
    for name in names:
        run = _probes(build(), x, y)[name]
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    return first


def _measure(variants, repeats, inner):
    for run in variants.values():
        # Trace and warm up; the ics variants and the landscape pair share
        # one cache slot each, so they retrace when alternating: warm both.
        run()
        run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            run()  # absorb a retrace from the previous variant
            start = time.perf_counter()
            for _ in range(inner):
                run()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in times.items()}


def _print_table(title, medians, first):
    base = medians["train_on_batch"]
    compiled = medians["train_step"]
    print(f"\n{title}, batch {BATCH}")
    print(
        f"{'variant':<15}{'ms':>9}{'x tob':>8}{'x step':>8}"
        f"{'per_step@' + str(PERIOD):>15}{'first s':>9}"
    )
    for name, seconds in medians.items():
        ratio = seconds / base
        mark = ""
        if name not in ("train_on_batch", "train_step"):
            mark = " ok" if ratio <= TARGET else " >2x"
        once = f"{first[name]:>9.2f}" if name in first else " " * 9
        print(
            f"{name:<15}{seconds * 1e3:>9.2f}{ratio:>8.2f}"
            f"{seconds / compiled:>8.2f}{ratio / PERIOD:>15.3f}{once}{mark}"
        )


def _deep(x, y, repeats, inner):
    """ICS of the 25-layer linear net, unrolled vs looped."""
    from tfnorm import diagnostics

    for bn in (False, True):

        def build(bn=bn):
            return _build(bn, hidden=(64,) * 24, activation="linear")

        model = build()
        variants = {"train_on_batch": lambda m=model: m.train_on_batch(x, y)}
        first = {}
        for unroll in (True, False):
            name = "ics_unrolled" if unroll else "ics_looped"
            fresh = build()
            start = time.perf_counter()
            diagnostics.internal_covariate_shift(fresh, x, y, unroll=unroll)
            first[name] = time.perf_counter() - start
            variants[name] = lambda m=fresh, u=unroll: (
                diagnostics.internal_covariate_shift(m, x, y, unroll=u)
            )
        medians = _measure(variants, repeats, inner)
        title = "with tfnorm BN" if bn else "without BN"
        print(f"\n25-layer linear net (width 64) {title}, batch {BATCH}")
        print(f"{'variant':<15}{'ms':>9}{'x tob':>8}{'first s':>9}")
        for name, seconds in medians.items():
            once = f"{first[name]:>9.2f}" if name in first else ""
            ratio = seconds / medians["train_on_batch"]
            print(f"{name:<15}{seconds * 1e3:>9.2f}{ratio:>8.2f}{once}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--deep", action="store_true")
    args = parser.parse_args()
    repeats, inner = (5, 5) if args.quick else (15, 10)

    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 784)).astype("float32")
    y = rng.integers(0, 10, BATCH).astype("int32")
    for bn in (False, True):
        model = _build(bn)
        variants = _variants(model, x, y)
        first = _first_calls(
            lambda bn=bn: _build(bn), x, y, list(_probes(model, x, y))
        )
        medians = _measure(variants, repeats, inner)
        title = "with tfnorm BN" if bn else "without BN"
        _print_table(f"MLP 784-6x256-10 {title}", medians, first)
    print(
        "\nx tob: relative to model.train_on_batch; x step: relative to the "
        "tf.function train step; per_step@25: overhead per training step "
        "when probing every 25 steps (x tob / 25); first s: the first "
        "call on a fresh model. The marks compare a single probe with the "
        f"target of {TARGET}x train_on_batch."
    )
    if args.deep:
        _deep(x, y, repeats, inner)


if __name__ == "__main__":
    main()
