"""The layer contract of the tfnorm dropout layers.

Build, call in both modes, config round trip, `.keras` save and load, one
`fit` step in graph mode and under XLA, and mixed precision.
"""

import json

import keras
import numpy as np


def _plain(config):
    # Keras writes shapes back as lists after loading: compare JSON forms.
    return json.loads(json.dumps(config))


def check_dropout_contract(make_layer, x, tmp_path, identity=True):
    """Runs the contract on `make_layer()` with input `x` (a numpy array).

    `identity` says whether inference returns the input unchanged (false for
    wrappers, which run their layer).
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

    # A `.keras` round trip keeps weights, config and inference outputs.
    inputs = keras.Input(x.shape[1:])
    hidden = make_layer()(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _plain(loaded.layers[1].get_config()) == _plain(
        model.layers[1].get_config()
    )

    # One fit step in graph mode and one under XLA leave finite weights.
    target = np.zeros((len(x), 1), "float32")
    for jit in (False, True):
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        model.fit(x, target, batch_size=len(x), verbose=0)
        for w in model.get_weights():
            assert np.all(np.isfinite(w)), f"jit_compile={jit}"

    # Mixed precision: float16 out, float32 rate and weights.
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
