"""BN before vs after the activation (Ioffe & Szegedy 2015 place it
before; public benchmarks disagree on which is better), at CPU scale."""

from zoo import experiments
from zoo import studies
from zoo import verdict
from zoo.studies import common


@experiments.register
def bn_placement():
    """BN before vs after the ReLU: 6x256 MLP, SGD 0.1, 5 seeds.

    Paper: Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167 (BN
    before the nonlinearity); SCIENCE.md "Also worth running": the
    effect of the placement is small and depends on the architecture (a
    public CaffeNet benchmark: after the ReLU 0.499 vs before 0.474
    top-1; GoogLeNet reverses it).

    Command: `tfnorm-zoo run bn-placement` (`--smoke` in seconds);
    `tfnorm-zoo reproduce` runs it with the other studies.

    Measured: 1 min 10 s for the 10 runs on 2 shared CPU cores.
    Verdict: inconclusive. Final validation accuracy, mean ± std over 5
    seeds: after the ReLU 0.950 ± 0.011, before it 0.948 ± 0.004; the
    means are 0.002 apart, but one seed of BN after (0.933) keeps the
    spread too wide to call the gap smaller than a point.

    The basics MLP (784-6x256-10, ReLU, Keras's default initialization)
    with tfnorm BN before or after each ReLU, plain SGD at 0.1, batch 64,
    600 steps, 5 seeds, on the MNIST digits.
    """
    return experiments.Experiment(
        name="bn-placement",
        dataset="digits",
        variants=("bn_before", "bn_after"),
        seeds=5,
        learning_rate=0.1,
        threshold=0.9,
    )


def evaluate_placement(accuracy):
    """The check from `{variant: [final val accuracy per seed]}`."""
    return [
        verdict.close(
            "BN after the ReLU within 1 point of BN before it",
            accuracy["bn_after"],
            accuracy["bn_before"],
            tolerance=0.01,
        )
    ]


def _evaluate(exp_dir, runs):
    table = common.by_arm(runs, common.final_accuracy)
    accuracy = {variant: values for (variant, _), values in table.items()}
    checks = evaluate_placement(accuracy)
    headline = (
        f"val accuracy: after {verdict.Stat.of(accuracy['bn_after']).text(3)}"
        f", before {verdict.Stat.of(accuracy['bn_before']).text(3)}"
    )
    return studies.Evaluation(checks=checks, headline=headline)


studies.register(
    studies.Study(
        name="bn-placement",
        claim="Whether BN goes before or after the activation changes "
        "accuracy only a little, and which is better depends on the "
        "architecture.",
        paper="Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167",
        paper_result="ImageNet CaffeNet benchmark: BN after the ReLU 0.499 "
        "vs before 0.474 top-1; GoogLeNet reverses the order.",
        criteria="the two placements within 1 point of each other (this "
        "zoo's reading of 'small'; SCIENCE.md sets no number).",
        evaluate=_evaluate,
    )
)
