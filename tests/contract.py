"""One layer-contract check shared by the layer tests.

Keras's own testing module is private API, so tfnorm keeps its own: build,
call in both modes, config round trip, `.keras` save and load, and one
`fit` step in eager, graph and XLA modes.
"""

import keras
import numpy as np


def check_layer_contract(layer_factory, x, tmp_path, atol=1e-6):
    """Runs the contract on `layer_factory()` with input `x`.

    Returns the reloaded model so callers can add their own checks.
    """
    layer = layer_factory()
    y_inference = np.asarray(layer(x, training=False))
    assert y_inference.shape == x.shape
    assert np.all(np.isfinite(np.asarray(layer(x, training=True))))

    # Config round trip gives an equivalent, unbuilt layer.
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config

    # `.keras` round trip keeps weights and inference outputs.
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, layer_factory()(inputs))
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol
    )
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    # One fit step in each execution mode leaves finite weights.
    for mode in ({"run_eagerly": True}, {}, {"jit_compile": True}):
        model.compile(optimizer="sgd", loss="mse", **mode)
        model.fit(x, np.zeros_like(x), batch_size=len(x), verbose=0)
        for w in model.get_weights():
            assert np.all(np.isfinite(w)), mode
    return loaded
