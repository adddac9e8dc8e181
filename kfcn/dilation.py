"""Filter rarefaction: a trunk's features at a finer output stride, with the same weights.

Long, Shelhamer and Darrell (TPAMI 2017), section 3.2: to make a net's output
denser, set a downsampling layer's stride to 1 and spread ("rarefy") the filters
of every later layer by the stride removed, ``f'[i] = f[i / s]`` where ``s``
divides ``i``. The later layers then compute, on the finer lattice, exactly what
they computed before, and also the outputs between the old ones. DeepLab calls
it atrous (dilated) convolution; mmsegmentation's dilated ResNets
(`ResNetV1c(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)`,
mmseg/models/backbones/resnet.py) are its best-known use.

`dilate` applies it to any functional Keras model whose layers it knows
(convolutions, pooling, padding, merges, normalisation, activations,
squeeze-excite blocks), reading every layer's stride from `kfcn.geometry`.
Each layer is dilated by the stride lost at its *input*: the general rule, which
reproduces mmseg's `contract_dilation` (a dilated stage's first block, whose 3x3
convolution was the strided one, runs at half the stage's rate) without knowing
what a stage is.

Exactness. On an input whose sides are multiples of the model's stride, the
dilated model's output sampled every ``stride // output_stride`` pixels from
pixel 0 equals the original output everywhere, borders included. For that,
every padding must land on the rarefied lattice:

- a strided layer with TensorFlow's "same" padding pads asymmetrically
  (``(k - s) // 2`` before, the rest after); run at stride 1 it gets explicit
  padding (a `ZeroPadding2D` named ``<layer>_pad``, or padding inside the
  pooling layer) with the original's top/left padding times the input's rate;
- explicit `ZeroPadding2D`/`Cropping2D` amounts are multiplied by the rate;
- pooling uses `kfcn.layers.DilatedPooling2D` (Keras' pooling layers take no
  dilation), in which padding never counts, as in Keras' "same" pooling;
- global pooling (squeeze-excite) averages the lattice only: a 1x1 max pooling
  with stride equal to the rate (``<layer>_lattice``) picks it first. Averaging
  the whole dense map instead would change every output a little.
"""

from __future__ import annotations

import logging

import keras

from kfcn import geometry
from kfcn.layers import DilatedPooling2D, FullyConnectedConv2D, Preprocess, Scale

logger = logging.getLogger(__name__)

_CONVOLUTIONS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
)
_POOLINGS = {keras.layers.MaxPooling2D: "max", keras.layers.AveragePooling2D: "avg"}
_GLOBAL_POOLINGS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# Layers that act on each position alone (or merge maps position by position):
# they run unchanged on a rarefied map.
_POSITIONWISE = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.layers.Dropout,
    keras.layers.Dense,
    keras.layers.Identity,
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
    Preprocess,
    Scale,
)
# Keras ops applied directly to symbolic tensors (``x + 3.0`` in MobileNetV3's
# hard sigmoid) that are elementwise.
_ELEMENTWISE_OPS = {
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Negative",
    "Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSilu", "Silu", "Swish", "Gelu", "Tanh",
    "Clip", "Cast", "Square", "Sqrt", "Exp", "Abs",
}  # fmt: skip


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _is_power_of_two(value) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= 1
        and (value & (value - 1) == 0)
    )


class _Rarefier:
    """Rebuilds a functional graph with every layer adapted to the new output stride.

    Every tensor of the original graph at stride ``S`` (per axis, from
    `kfcn.geometry.trace`) becomes a tensor at stride ``min(S, output_stride)``,
    ``rate = S // min(S, output_stride)`` times denser, whose entries ``rate * j``
    are the original entries ``j``. A concrete "probe" size, a multiple of the
    model's stride, is carried through the original layers to learn each map's
    size relative to the image, which fixes the padding after each window.
    """

    def __init__(self, output_stride: int):
        self.output_stride = output_stride
        self.names: set[str] = set()
        self.shared: dict = {}
        self.copied: set[int] = set()

    # -- bookkeeping ---------------------------------------------------------

    def _name(self, name: str) -> str:
        unique, n = name, 1
        while unique in self.names:
            unique, n = f"{name}_{n}", n + 1
        self.names.add(unique)
        return unique

    def _rate(self, stride: tuple[int, int], layer) -> tuple[int, int]:
        rate = []
        for s in stride:
            if s > self.output_stride and s % self.output_stride:
                raise ValueError(
                    f"`output_stride`={self.output_stride} does not divide the stride {s} of "
                    f"layer {layer.name!r}'s input."
                )
            rate.append(s // min(s, self.output_stride))
        return tuple(rate)

    def _new_layer(self, layer, config: dict, cls=None):
        key = (id(layer), repr(sorted(config.items())), cls)
        if key not in self.shared:  # a layer called at several nodes stays shared
            config = {**config, "name": self._name(layer.name)}
            self.shared[key] = (cls or type(layer)).from_config(config)
        return self.shared[key]

    def _copy_weights(self, source, target) -> None:
        if source.weights and id(target) not in self.copied:
            target.set_weights(source.get_weights())
            finalize = getattr(target, "finalize_state", None)
            if finalize is not None:  # an adapted Normalization reads its variables here
                finalize()
            self.copied.add(id(target))

    # -- the walk ------------------------------------------------------------

    def run(self, function, inputs: list, probes: list, input_geometry) -> tuple[list, list]:
        """Runs `function`'s graph on new `inputs`; returns new and probe outputs."""
        records = geometry.trace(function, input_geometry)
        geos = {id(t): input_geometry for t in function.inputs}
        geos.update({id(tensor): geo for _, tensor, geo in records})
        tensors = {id(t): x for t, x in zip(function.inputs, inputs)}
        probe = {id(t): p for t, p in zip(function.inputs, probes)}
        by_depth = function._nodes_by_depth  # noqa: SLF001 - Keras has no public walk
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                op = node.operation
                inner = geometry._functional_of(op)  # noqa: SLF001
                if inner is not None:
                    spatial = [
                        geos[id(t)]
                        for t in node.input_tensors
                        if isinstance(geos.get(id(t)), geometry.Geometry)
                    ]
                    outs, probe_outs = self.run(
                        inner,
                        [tensors[id(t)] for t in node.input_tensors],
                        [probe[id(t)] for t in node.input_tensors],
                        spatial[0] if spatial else geometry.IDENTITY,
                    )
                else:
                    in_geos = [geos.get(id(t), geometry.UNKNOWN) for t in node.input_tensors]
                    out_geo = geos.get(id(node.outputs[0]), geometry.UNKNOWN)
                    probe_args, probe_kwargs = node.arguments.fill_in(probe)
                    probe_outs = keras.tree.flatten(
                        op.compute_output_spec(*probe_args, **probe_kwargs)
                    )
                    args, kwargs = node.arguments.fill_in(tensors)
                    outs = keras.tree.flatten(
                        self._apply(op, in_geos, out_geo, probe_args, args, kwargs)
                    )
                for x, y, p in zip(node.outputs, outs, probe_outs):
                    tensors[id(x)] = y
                    probe[id(x)] = p
        return (
            [tensors[id(t)] for t in function.outputs],
            [probe[id(t)] for t in function.outputs],
        )

    def _apply(self, op, in_geos, out_geo, probe_args, args, kwargs):
        if not isinstance(op, keras.layers.Layer):
            return self._apply_operation(op, in_geos, args, kwargs)
        spatial = [g for g in in_geos if isinstance(g, geometry.Geometry)]
        rate = self._rate(spatial[0].stride, op) if spatial else (1, 1)
        if spatial and (isinstance(op, _CONVOLUTIONS) or type(op) in _POOLINGS):
            if not isinstance(out_geo, geometry.Geometry):
                raise ValueError(
                    f"Cannot dilate layer {op.name!r}: its output has no stride on the image."
                )
            in_size = tuple(probe_args[0].shape[1:3])
            out_size = tuple(op.compute_output_shape(probe_args[0].shape)[1:3])
            return self._apply_window(op, spatial[0], out_geo, rate, in_size, out_size, args)
        if rate == (1, 1):
            return self._call(op, op.get_config(), args, kwargs)
        if isinstance(op, (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)):
            key = "padding" if isinstance(op, keras.layers.ZeroPadding2D) else "cropping"
            rows, cols = getattr(op, key)
            scaled = (tuple(rate[0] * a for a in rows), tuple(rate[1] * a for a in cols))
            config = {**op.get_config(), key: scaled}
            return self._call(op, config, args, kwargs)
        if isinstance(op, _GLOBAL_POOLINGS):
            # The original averaged its own positions only: the lattice, phase 0.
            lattice = keras.layers.MaxPooling2D(
                pool_size=1, strides=rate, name=self._name(f"{op.name}_lattice")
            )
            return self._call(op, op.get_config(), [lattice(args[0]), *args[1:]], kwargs)
        if isinstance(op, _POSITIONWISE):
            return self._call(op, op.get_config(), args, kwargs)
        raise ValueError(
            f"Cannot dilate layer {op.name!r} ({type(op).__name__}): it works on a map at "
            f"stride {spatial[0].stride} > `output_stride`={self.output_stride}, and kfcn does "
            "not know it to act on each position alone."
        )

    def _apply_operation(self, op, in_geos, args, kwargs):
        spatial = [g for g in in_geos if isinstance(g, geometry.Geometry)]
        if spatial and max(spatial[0].stride) > self.output_stride:
            if type(op).__name__ not in _ELEMENTWISE_OPS:
                raise ValueError(
                    f"Cannot dilate operation {op.name!r} ({type(op).__name__}) on a map at "
                    f"stride {spatial[0].stride} > `output_stride`={self.output_stride}."
                )
        return op(*args, **kwargs)  # stateless: the same operation serves both graphs

    def _call(self, op, config, args, kwargs, cls=None):
        layer = self._new_layer(op, config, cls)
        outputs = layer(*args, **kwargs)
        self._copy_weights(op, layer)
        return outputs

    def _apply_window(self, op, in_geo, out_geo, rate, in_size, out_size, args):
        """A convolution or pooling at its new stride, dilated by `rate`, padded on the lattice."""
        kernel = _pair(getattr(op, "kernel_size", None) or op.pool_size)
        dilation = _pair(getattr(op, "dilation_rate", 1) or 1)
        strides = _pair(op.strides)
        new_in = tuple(min(s, self.output_stride) for s in in_geo.stride)
        new_out = tuple(min(s, self.output_stride) for s in out_geo.stride)
        new_strides = tuple(o // i for o, i in zip(new_out, new_in))
        if rate == (1, 1) and new_strides == strides:
            return self._call(op, op.get_config(), args, {})
        before, after, new_dilation, spans = [], [], [], []
        for axis in range(2):
            k, d, s, r = kernel[axis], dilation[axis], strides[axis], rate[axis]
            effective = d * (k - 1) + 1
            if op.padding == "same":  # TensorFlow: (total) // 2 before
                remainder = in_size[axis] % s
                pad_before = max(effective - (remainder or s), 0) // 2
            else:
                pad_before = 0
            new_effective = r * (effective - 1) + 1
            # Entry j of the original reads input j*s - pad_before + t*d; on the lattice
            # that is r*(j*s - pad_before + t*d): pad r*pad_before before, and after
            # enough for the new map to be exactly r*s/new_stride times the original.
            top = r * pad_before
            bottom = r * (s * out_size[axis] - in_size[axis]) - new_strides[axis]
            bottom += new_effective - top
            if bottom < 0:
                raise ValueError(
                    f"Cannot dilate layer {op.name!r}: it drops {-bottom} trailing rows or "
                    "columns of its input, which the rarefied map would keep."
                )
            before.append(top)
            after.append(bottom)
            new_dilation.append(d * r if k > 1 else 1)
            spans.append(new_effective)
        logger.info(
            "dilate: %s strides %s -> %s, dilation %s -> %s, padding %s",
            op.name, strides, new_strides, dilation, tuple(new_dilation),
            tuple(zip(before, after)),
        )  # fmt: skip
        padding = tuple(zip(before, after))
        # Stride-1 "same" padding is (k - 1) // 2 before, the rest after, for any size.
        same = all(
            s == 1 and b == (k - 1) // 2 and a == k - 1 - b
            for s, b, a, k in zip(new_strides, before, after, spans)
        )
        valid = not any(before) and not any(after)
        x = args[0]
        if type(op) in _POOLINGS:
            if new_dilation == [1, 1] and (same or valid):
                config = {**op.get_config(), "strides": new_strides}
                config["padding"] = "same" if same and not valid else "valid"
                return self._call(op, config, [x], {})
            pooling = DilatedPooling2D(
                _POOLINGS[type(op)],
                pool_size=kernel,
                strides=new_strides,
                dilation_rate=tuple(new_dilation),
                padding=padding,
                name=self._name(op.name),
                dtype=op.dtype_policy,
            )
            return pooling(x)
        config = {
            **op.get_config(),
            "strides": new_strides,
            "dilation_rate": tuple(new_dilation),
            "padding": "same" if same and not valid else "valid",
        }
        if not (same or valid):
            pad = keras.layers.ZeroPadding2D(padding, name=self._name(f"{op.name}_pad"))
            x = pad(x)
        # FullyConnectedConv2D computes by im2col, for stride 1 and no dilation only.
        cls = keras.layers.Conv2D if type(op) is FullyConnectedConv2D else None
        return self._call(op, config, [x], {}, cls=cls)


def model_stride(model: keras.Model) -> int:
    """The largest stride of `model`'s outputs on its input image (`kfcn.geometry`)."""
    records = geometry.trace(model)
    outputs = {id(t) for t in model.outputs}
    strides = [
        max(geo.stride)
        for _, tensor, geo in records
        if id(tensor) in outputs and isinstance(geo, geometry.Geometry)
    ]
    if not strides:
        raise ValueError(
            "`model` must output a map whose stride on its input kfcn.geometry can trace (a "
            f"trunk or a score map, not an upsampled FCN). Received: {model.name!r}"
        )
    return max(strides)


def dilate(model: keras.Model, output_stride: int) -> keras.Model:
    """Filter rarefaction: the same network at a finer output stride.

    Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
    Segmentation", TPAMI 2017, section 3.2; DeepLab's atrous convolution;
    mmsegmentation's dilated ResNets (`strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)`
    for output stride 8). Every stride-2 layer past the point where the stride
    reaches `output_stride` runs at stride 1, and every later convolution and
    pooling is dilated by the stride lost at its input.

    Args:
        model: A functional Keras model taking images (Keras Applications with
            `include_top=False`, kfcn's own backbones, any trunk of known layers).
            Nested functional models are flattened into the result.
        output_stride: A power of two from 1 to the model's own stride.

    Returns:
        A new functional model with copies of `model`'s layers and weights
        (changing it leaves `model` untouched). Its layers keep their names;
        padding moved out of a strided layer is a `ZeroPadding2D` named
        ``<layer>_pad``. On an image whose sides are multiples of the model's
        stride, ``dilated(x)[:, ::r, ::r]`` with ``r = stride // output_stride``
        equals ``model(x)`` to float32 round-off, borders included.

    Raises:
        ValueError: If `output_stride` is not a power of two from 1 to the
            model's stride, or the model has a layer kfcn cannot dilate (one
            that moves positions, such as `Flatten` or `UpSampling2D`, past
            the output stride).

    Example:
        >>> trunk = keras.applications.ResNet50(include_top=False, weights=None)
        >>> d8 = kfcn.dilate(trunk, output_stride=8)
        >>> d8(np.zeros((1, 64, 96, 3))).shape
        TensorShape([1, 8, 12, 2048])
    """
    if not isinstance(model, keras.Model) or geometry._functional_of(model) is None:  # noqa: SLF001
        raise ValueError(f"`model` must be a functional keras.Model. Received: {model!r}")
    model = geometry._functional_of(model)  # noqa: SLF001 - a Sequential's inner graph
    stride = model_stride(model)
    if not _is_power_of_two(output_stride) or output_stride > stride:
        raise ValueError(
            f"`output_stride` must be a power of two from 1 to the model's stride {stride}. "
            f"Received: output_stride={output_stride!r}"
        )
    rarefier = _Rarefier(output_stride)
    inputs, probes = [], []
    for tensor in model.inputs:
        name = rarefier._name(tensor._keras_history.operation.name)  # noqa: SLF001
        inputs.append(keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=name))
        # A size that is a multiple of the stride, unless the model fixes one.
        size = [s if s is not None else stride * (4 + i) for i, s in enumerate(tensor.shape[1:3])]
        probes.append(keras.KerasTensor((1, *size, *tensor.shape[3:]), dtype=tensor.dtype))
    outputs, _ = rarefier.run(model, inputs, probes, geometry.IDENTITY)
    outputs = keras.tree.pack_sequence_as(model._outputs_struct, outputs)  # noqa: SLF001
    inputs = keras.tree.pack_sequence_as(model._inputs_struct, inputs)  # noqa: SLF001
    return keras.Model(inputs, outputs, name=f"{model.name}_os{output_stride}")
