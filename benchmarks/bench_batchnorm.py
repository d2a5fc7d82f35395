"""Speed and memory of one BN layer's training step: tfnorm vs the anchors.

Measures forward plus backward (gradients for the input and the layer's
trainable weights) of one layer in training mode on a (128, 32, 32, 64)
float32 tensor, in graph mode (`tf.function`) and under XLA
(`jit_compile=True`). The variants run interleaved in one process,
round-robin over the repeats, so machine noise hits them alike; each
variant's time is the median over repeats of the mean step time.

Variants: Keras 3 BN, tf-keras BN (fused kernel), tf-keras ghost BN
(virtual_batch_size=32), tfnorm plain, ghost (32), renorm, ghost + renorm,
and the elementwise floor `y = a * x + b` (per-channel a, b), the cheapest
layer that touches every element forward and backward.

Peak memory of a training step: the TF allocator's peak bytes
(`tf.config.experimental.get_memory_info`, kept for the CPU allocator too
in TF 2.21) during one step after a reset, minus the bytes live before it
(the inputs). This counts what TF allocates, not the process RSS.

Run (about 35 s on 2 CPU cores with --quick, 2 minutes without):

    python benchmarks/bench_batchnorm.py --quick
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPE = (128, 32, 32, 64)
GHOST = 32
VARIANTS = (
    "keras",
    "tf_keras_fused",
    "tf_keras_ghost",
    "tfnorm_plain",
    "tfnorm_ghost",
    "tfnorm_renorm",
    "tfnorm_ghost_renorm",
    "floor",
)
# Target ratios from issue #2.
TARGETS = {
    "graph_vs_keras": {"tfnorm_plain": 0.6},
    "graph_vs_plain": {
        "tfnorm_ghost": 1.15,
        "tfnorm_renorm": 1.15,
        "tfnorm_ghost_renorm": 1.15,
    },
    "xla_vs_keras": 1.05,
    "memory_vs_keras": 1.2,
}


def _tf():
    import tensorflow as tf

    return tf


class _Floor:
    """`y = a * x + b` per channel: the elementwise cost floor."""

    def __init__(self, channels):
        tf = _tf()
        self.a = tf.Variable(tf.ones([channels]), name="a")
        self.b = tf.Variable(tf.zeros([channels]), name="b")
        self.trainable_variables = [self.a, self.b]

    def __call__(self, x, training=True):
        return x * self.a + self.b


def make_layer(name, channels):
    """A built layer of the variant and its trainable variables."""
    if name == "floor":
        layer = _Floor(channels)
        return layer, layer.trainable_variables
    if name.startswith("tf_keras"):
        import tf_keras

        kwargs = {"fused": True} if name == "tf_keras_fused" else {}
        if name == "tf_keras_ghost":
            kwargs = {"virtual_batch_size": GHOST}
        layer = tf_keras.layers.BatchNormalization(**kwargs)
    elif name == "keras":
        import keras

        layer = keras.layers.BatchNormalization()
    else:
        import tfnorm

        layer = tfnorm.BatchNormalization(
            virtual_batch_size=GHOST if "ghost" in name else None,
            renorm="renorm" in name,
            renorm_clipping=(
                {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
                if "renorm" in name
                else None
            ),
        )
    layer.build((None, *SHAPE[1:]))
    return layer, list(layer.trainable_variables)


def make_step(layer, variables, jit_compile):
    """A compiled training step: forward, then input and weight gradients."""
    tf = _tf()

    @tf.function(jit_compile=jit_compile)
    def step(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            # A fixed random upstream gradient, so backward does real work.
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, *variables])
        # One scalar to fetch: forces the whole step to finish.
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return step


def _inputs():
    tf = _tf()
    x = tf.random.stateless_normal(SHAPE, seed=(1, 2)) * 2.0 + 0.5
    upstream = tf.random.stateless_normal(SHAPE, seed=(3, 4))
    return x, upstream


def time_variants(names, jit_compile, repeats, iters, warmup):
    """Median seconds per step of each variant, interleaved round-robin."""
    x, upstream = _inputs()
    steps = {}
    for name in names:
        layer, variables = make_layer(name, SHAPE[-1])
        steps[name] = make_step(layer, variables, jit_compile)
        for _ in range(warmup):  # trace, compile, warm caches
            steps[name](x, upstream).numpy()
    samples = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            for _ in range(iters):
                out = steps[name](x, upstream)
            out.numpy()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


# ---------------------------------------------------------------------------
# Memory


def measure_memory(names, jit_compile):
    """Peak bytes a training step allocates beyond what was live before.

    Uses the TF allocator's own counters (`get_memory_info`, which TF 2.21
    also keeps for the CPU allocator): reset the peak, run one step, read
    the peak minus the bytes in use before it. The inputs are live
    throughout and so are excluded; a layer's intermediate tensors, the
    saved activations and the gradients count.
    """
    tf = _tf()
    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    x, upstream = _inputs()
    results = {}
    for name in names:
        layer, variables = make_layer(name, SHAPE[-1])
        step = make_step(layer, variables, jit_compile)
        step(x, upstream).numpy()  # trace and compile outside the window
        before = tf.config.experimental.get_memory_info(device)["current"]
        tf.config.experimental.reset_memory_stats(device)
        step(x, upstream).numpy()
        peak = tf.config.experimental.get_memory_info(device)["peak"]
        results[name] = peak - before
    return results


# ---------------------------------------------------------------------------
# Report


def _check(ratio, limit):
    if limit is None:
        return ""
    return f"  target <= {limit:.2f}: {'met' if ratio <= limit else 'MISSED'}"


def report_times(mode, times):
    keras_t = times["keras"]
    plain_t = times.get("tfnorm_plain")
    print(f"\n{mode}: median ms per step (forward + backward)")
    print(f"{'variant':22s} {'ms':>8s} {'/keras':>7s} {'/plain':>7s}")
    for name, t in times.items():
        vs_plain = f"{t / plain_t:7.2f}" if plain_t else "      -"
        limit = None
        if mode == "graph":
            limit = TARGETS["graph_vs_keras"].get(name)
            if name in TARGETS["graph_vs_plain"]:
                limit_plain = TARGETS["graph_vs_plain"][name]
                note = _check(t / plain_t, limit_plain).replace(
                    "target", "target(/plain)"
                )
            else:
                note = _check(t / keras_t, limit)
        elif name.startswith("tfnorm"):
            note = _check(t / keras_t, TARGETS["xla_vs_keras"])
        else:
            note = ""
        print(f"{name:22s} {t * 1e3:8.2f} {t / keras_t:7.2f} {vs_plain}{note}")


def report_memory(mode, mem):
    keras_b = mem["keras"]
    print(f"\n{mode}: peak memory of a step beyond its inputs")
    print(f"{'variant':22s} {'MiB':>8s} {'/keras':>7s}")
    for name, m in mem.items():
        ratio = m / keras_b if keras_b > 0 else float("nan")
        note = ""
        if name.startswith("tfnorm"):
            note = _check(ratio, TARGETS["memory_vs_keras"])
        print(f"{name:22s} {m / 2**20:8.1f} {ratio:7.2f}{note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (minutes on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset (keras is always included)",
    )
    parser.add_argument("--no-xla", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)

    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if "keras" not in names:
        names.insert(0, "keras")
    repeats = args.repeats or (3 if args.quick else 7)
    iters = args.iters or (2 if args.quick else 5)

    tf = _tf()
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(
        f"shape {SHAPE} float32 on {device}, TF {tf.__version__}, "
        f"{os.cpu_count()} CPUs; {repeats} repeats x {iters} steps, "
        "round-robin, medians"
    )
    modes = [("graph", False)] + ([] if args.no_xla else [("xla", True)])
    for mode, jit in modes:
        times = time_variants(names, jit, repeats, iters, warmup=2)
        report_times(mode, times)
    if not args.no_memory:
        for mode, jit in modes:
            report_memory(mode, measure_memory(names, jit))


if __name__ == "__main__":
    main()
