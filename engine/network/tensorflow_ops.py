"""The TensorFlow operations the streamed forward runs (`model.make_logit_fn`), imported without TensorFlow's
package import where TensorFlow allows it; and TensorFlow's import with its start-up messages kept quiet.

`import tensorflow` loads TensorFlow's whole public API, about 3,500 modules (3.7-4.4 s and 640 MB on 2 cores,
Keras kept out), of which running the network needs the operations of `TensorFlowOps`: about 680 modules
(1.2 s, 410 MB). `tensorflow_ops` imports the modules that define them, starts TensorFlow as its package import
does (eager execution, TensorFlow 2 behaviour), and is tested to give the public API's own functions (the public
`constant` and `reshape` wrap them for WeakTensor dtype rules, which act only with NumPy behaviour on); where a
TensorFlow release has moved one, or TensorFlow is already imported, it takes them from the public API instead.
The package's own `__init__` runs when the public API is first asked for (training, Keras).
"""

import importlib
import importlib.util
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache
from operator import attrgetter

_ARRAY_OPS = "tensorflow.python.ops.array_ops"
_MATH_OPS = "tensorflow.python.ops.math_ops"
_NN_OPS = "tensorflow.python.ops.nn_ops"


@dataclass(frozen=True)
class TensorFlowOps:
    """What the streamed forward calls; `SOURCES` names each in TensorFlow's public API and where TensorFlow
    defines it."""

    function: object
    TensorSpec: object
    constant: object
    float32: object
    cast: object
    tensordot: object
    concat: object
    split: object
    reshape: object
    pad: object
    broadcast_to: object
    conv3d: object
    bias_add: object
    max_pool3d: object
    relu: object


SOURCES = {  # field: (public name, defining module, name there); checked against TensorFlow by the tests
    "function": ("function", "tensorflow.python.eager.polymorphic_function.polymorphic_function", "function"),
    "TensorSpec": ("TensorSpec", "tensorflow.python.framework.tensor", "TensorSpec"),
    "constant": ("constant", "tensorflow.python.framework.constant_op", "constant"),
    "float32": ("float32", "tensorflow.python.framework.dtypes", "float32"),
    "cast": ("cast", _MATH_OPS, "cast"),
    "tensordot": ("tensordot", _MATH_OPS, "tensordot"),
    "concat": ("concat", _ARRAY_OPS, "concat"),
    "split": ("split", _ARRAY_OPS, "split"),
    "reshape": ("reshape", _ARRAY_OPS, "reshape"),
    "pad": ("pad", _ARRAY_OPS, "pad_v2"),
    "broadcast_to": ("broadcast_to", "tensorflow.python.ops.gen_array_ops", "broadcast_to"),
    "conv3d": ("nn.conv3d", _NN_OPS, "conv3d_v2"),
    "bias_add": ("nn.bias_add", _NN_OPS, "bias_add"),
    "max_pool3d": ("nn.max_pool3d", _NN_OPS, "max_pool3d"),
    "relu": ("nn.relu", "tensorflow.python.ops.gen_nn_ops", "relu"),
}


@cache
def tensorflow_ops() -> TensorFlowOps:
    """The operations, imported once per process with TensorFlow's start-up messages kept quiet."""
    with quiet_stderr():
        if "tensorflow" not in sys.modules:
            try:
                return _defining_modules()
            except (ImportError, AttributeError):  # a TensorFlow release that moved one: the public API
                pass
        import_tensorflow_quietly()
        import tensorflow as tf

        return TensorFlowOps(**{name: attrgetter(SOURCES[name][0])(tf) for name in _names()})


def _names() -> list[str]:
    return [field.name for field in fields(TensorFlowOps)]


def _defining_modules() -> TensorFlowOps:
    """The operations from the modules that define them, under TensorFlow's package module whose `__init__` (the
    public API) runs when something first asks it for an attribute it lacks (PEP 562), as TensorFlow's C++ code
    and later imports of TensorFlow may."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("TensorFlow is not installed")
    package = importlib.util.module_from_spec(spec)

    def complete(name: str):
        del package.__dict__["__getattr__"]
        sys.modules["tensorflow"] = package
        with quiet_stderr():
            spec.loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["tensorflow"] = package
    try:
        ops = TensorFlowOps(**{name: getattr(importlib.import_module(SOURCES[name][1]), SOURCES[name][2])
                               for name in _names()})
        importlib.import_module("tensorflow.python.compat.v2_compat").enable_v2_behavior()
        importlib.import_module("tensorflow.python.framework.config").list_physical_devices()  # probing prints
    except BaseException:
        if package.__dict__.get("__getattr__") is complete:
            del sys.modules["tensorflow"]
        raise
    return ops


@contextmanager
def quiet_stderr():
    """TensorFlow's C++ start-up messages (CUDA probing, oneDNN notes) kept off the terminal, where they look like
    errors to users; shown if the block fails."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow's public API (`quiet_stderr`), without Keras; also completes the package module that
    `tensorflow_ops` left without it.

    TensorFlow's import also imports all of Keras when it can (about 1 s and 120 MB, matplotlib included),
    which running the network does not use: Keras is kept out of that import and imports as usual when
    something asks for it (`build_unet`, training).
    """
    keep_out_keras = "keras" not in sys.modules
    if keep_out_keras:
        sys.modules["keras"] = None  # TensorFlow catches the ImportError this gives
    try:
        with quiet_stderr():
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing prints too
    finally:
        if keep_out_keras and sys.modules.get("keras", False) is None:
            del sys.modules["keras"]
