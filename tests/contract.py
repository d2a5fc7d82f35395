"""The layer contract shared by every tfnorm layer test.

Keras's own testing module is private API, so tfnorm keeps one of its own:
call in both modes, config round trip, `.keras` save and load, one `fit`
step in eager, graph and XLA modes, and mixed precision.
"""

import json

import keras
import numpy as np


def _plain(config):
    # Keras writes shapes back as lists after loading: compare JSON forms.
    return json.loads(json.dumps(config))


def check_layer_contract(make_layer, x, tmp_path, identity=False, atol=1e-6):
    """Runs the contract on `make_layer()` with input `x` (a numpy array).

    `identity` says whether inference must return the input unchanged
    (dropout layers; not normalization layers or wrappers). Returns the
    reloaded model so callers can add their own checks.
    """
    layer = make_layer()
    y_train = np.asarray(layer(x, training=True))
    y_infer = np.asarray(layer(x, training=False))
    assert np.all(np.isfinite(y_train))
    assert y_train.shape == y_infer.shape
    if identity:
        np.testing.assert_array_equal(y_infer, x)

    # A config round trip gives the same config.
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config

    # A `.keras` round trip keeps weights, config and inference outputs. A
    # Dense head makes any output shape fit one loss.
    inputs = keras.Input(x.shape[1:])
    hidden = make_layer()(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol
    )
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _plain(loaded.layers[1].get_config()) == _plain(
        model.layers[1].get_config()
    )

    # One fit step in each execution mode leaves finite weights.
    target = np.zeros((len(x), 1), "float32")
    for mode in ({"run_eagerly": True}, {}, {"jit_compile": True}):
        model.compile(optimizer="sgd", loss="mse", **mode)
        model.fit(x, target, batch_size=len(x), verbose=0)
        for w in model.get_weights():
            assert np.all(np.isfinite(w)), mode

    # Mixed precision: float16 out, statistics and rates kept in float32.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer16 = make_layer()
        y16 = layer16(x, training=True)
        assert keras.backend.standardize_dtype(y16.dtype) == "float16"
        assert np.all(np.isfinite(np.asarray(y16)))
        for w in layer16.weights:
            assert keras.backend.standardize_dtype(w.dtype) != "float16"
    finally:
        keras.config.set_dtype_policy("float32")
    return loaded
