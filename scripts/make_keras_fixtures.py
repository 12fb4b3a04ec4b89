"""Build the Keras / tf2onnx fixtures in ``tests/fixtures/keras/`` with the real tools.

Needs tensorflow-cpu, tf_keras and tf2onnx (not project dependencies; CI uses the
committed files).  Each model is tiny and seeded; BN gammas, betas and running
statistics are randomized so that a wrong fold shows.  Files:

- ``keras3_conv1d_bn.onnx``, ``tfkeras_conv1d_bn.onnx``: ``Conv1D -> BN -> ReLU`` twice,
  pooled, Dense; tf2onnx's default export writes each BN as
  ``Unsqueeze -> Conv -> Squeeze -> Mul([1,C,1]) -> Add([1,C,1])``.
- ``keras3_conv2d_bn_noopt.onnx``: ``Conv2D -> BN`` and ``DepthwiseConv2D -> BN``,
  converted with tf2onnx's optimizers off (NHWC kept:
  ``Conv -> Transpose(0,2,3,1) -> Add([C])`` and ``... -> Mul([C]) -> Add([C])``).
- ``keras3_normalization.onnx``, ``tfkeras_normalization.onnx``,
  ``keras3_normalization_noopt.onnx``: EfficientNet's stem preprocessing,
  ``Rescaling`` and a ``Normalization`` layer built without weights (mean 0,
  variance 1), then a ``Conv2D -> BN`` stem.  The layer's ``(x - 0) / 1`` comes
  out of TF's grappler as ``Add(x, 0)`` and ``Mul(x, 1)`` ([1,1,1,3] constants).

    pip install tensorflow-cpu tf_keras tf2onnx   # in a separate venv
    python scripts/make_keras_fixtures.py [--out tests/fixtures/keras]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf2onnx
import tf2onnx.convert

OPSET = 17
SEED = 11


def randomize_bn(layers, rng: np.random.Generator) -> None:
    """Random gamma, beta, moving mean and variance for every BatchNormalization layer."""
    for layer in layers:
        if "BatchNormalization" in type(layer).__name__:
            c = layer.get_weights()[0].shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c).astype(np.float32),
                    rng.normal(0, 0.5, c).astype(np.float32),
                    rng.normal(0, 0.5, c).astype(np.float32),
                    rng.uniform(0.5, 2.0, c).astype(np.float32),
                ]
            )


def conv1d_model(k):
    """Conv1D + BN + ReLU twice, global average pool, Dense (``k`` is keras or tf_keras)."""
    x = inp = k.Input((32, 8), name="x")
    for f in (12, 16):
        x = k.layers.Conv1D(f, 3, padding="same", use_bias=False)(x)
        x = k.layers.BatchNormalization()(x)
        x = k.layers.ReLU()(x)
    x = k.layers.GlobalAveragePooling1D()(x)
    x = k.layers.Dense(4)(x)
    return k.Model(inp, x)


def conv2d_model(k):
    """Conv2D + BN + ReLU, DepthwiseConv2D + BN + ReLU on NHWC images, pooled, Dense.

    TF's grappler folds the first BN's scale into the Conv2D (an ``Add([C])`` stays
    after the Transpose); it leaves the depthwise one as ``Mul([C]) -> Add([C])``.
    """
    x = inp = k.Input((12, 12, 3), name="x")
    x = k.layers.Conv2D(8, 3, padding="same")(x)
    x = k.layers.BatchNormalization()(x)
    x = k.layers.ReLU()(x)
    x = k.layers.DepthwiseConv2D(3, padding="same")(x)
    x = k.layers.BatchNormalization()(x)
    x = k.layers.ReLU()(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    x = k.layers.Dense(4)(x)
    return k.Model(inp, x)


def normalization_model(k):
    """EfficientNet's input preprocessing (Rescaling, Normalization without weights) and a stem."""
    x = inp = k.Input((16, 16, 3), name="x")
    x = k.layers.Rescaling(1.0 / 255.0)(x)
    norm = k.layers.Normalization(axis=-1)
    x = norm(x)
    x = k.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = k.layers.BatchNormalization()(x)
    x = k.layers.Activation("swish")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inp, x)


def export(model, shape, path: str, optimize: bool = True) -> None:
    """tf2onnx.convert.from_function on the model in inference mode."""
    spec = (tf.TensorSpec((1, *shape), tf.float32, name="x"),)
    fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
    original = tf2onnx.convert._convert_common
    if not optimize:
        tf2onnx.convert._convert_common = lambda *a, **kw: original(*a, **{**kw, "optimizers": {}})
    try:
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET, output_path=path)
    finally:
        tf2onnx.convert._convert_common = original
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "keras"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import keras
    import tf_keras

    rng = np.random.default_rng(SEED)
    tf.random.set_seed(SEED)
    for name, k in (("keras3", keras), ("tfkeras", tf_keras)):
        m = conv1d_model(k)
        randomize_bn(m.layers, rng)
        export(m, (32, 8), os.path.join(args.out, f"{name}_conv1d_bn.onnx"))
    m = conv2d_model(keras)
    randomize_bn(m.layers, rng)
    export(m, (12, 12, 3), os.path.join(args.out, "keras3_conv2d_bn_noopt.onnx"), optimize=False)
    m = normalization_model(keras)
    randomize_bn(m.layers, rng)
    export(m, (16, 16, 3), os.path.join(args.out, "keras3_normalization.onnx"))
    export(m, (16, 16, 3), os.path.join(args.out, "keras3_normalization_noopt.onnx"), optimize=False)
    m = normalization_model(tf_keras)
    randomize_bn(m.layers, rng)
    export(m, (16, 16, 3), os.path.join(args.out, "tfkeras_normalization.onnx"))


if __name__ == "__main__":
    main()
