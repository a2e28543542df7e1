"""Foreign `.onnx` files (deploy/runtime.py): metadata that lies or is malformed, graphs with
other input or output types, graphs whose outputs are not finite. `predict` and `evaluate`
refuse each with one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CLASSES = ["a", "b", "c"]
NAMES = json.dumps(CLASSES)


def classifier(path, *, classes=NAMES, metadata=None, in_type=TensorProto.FLOAT,
               in_shape=("N", 3, 32, 32), out_classes=3, weight=1.0, cast_to=None):
    """A tiny graph: global average pool, then a (3 x out_classes) matrix; written to `path`
    with `classes` (and `metadata`) as its metadata."""
    x = helper.make_tensor_value_info("x", in_type, list(in_shape))
    w = numpy_helper.from_array(np.full((3, out_classes), weight, np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["xf"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    out_type = TensorProto.FLOAT
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["logits"], ["y"], to=cast_to))
        out_type = cast_to
    else:
        nodes[-1].output[0] = "y"
    y = helper.make_tensor_value_info("y", out_type, ["N", out_classes])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in ({"classes": classes} | (metadata or {})).items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """An image folder of the classes a, b and c, to evaluate on."""
    for name in CLASSES:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    return tmp_path / "data"


def test_a_well_formed_foreign_file_predicts(tmp_path, image, capsys):
    model = classifier(tmp_path / "m.onnx")
    assert main(["predict", str(model), str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["class"] for p in out[0]["predictions"]] == CLASSES  # equal scores, stable order


@pytest.mark.parametrize("changes, message", [
    ({"classes": "not json ["}, "metadata 'classes' is not JSON"),
    ({"classes": "5"}, "metadata 'classes' is a int, not a list"),
    ({"classes": "null"}, "metadata 'classes' is a NoneType, not a list"),
    ({"classes": '{"a": 1}'}, "metadata 'classes' is a dict, not a list"),
    ({"classes": '["a", 2, "c"]'}, "not a list of at least 2 class names"),
    ({"classes": '["a"]', "out_classes": 1}, "not a list of at least 2 class names"),
    ({"classes": '["a", "b"]'}, "output is tensor(float) ['N', 3], not float (N, 2)"),
    ({"classes": None}, "no class names in its metadata"),
    ({"metadata": {"split": "[1, 2]"}}, "metadata 'split' is a list, not a dict"),
    ({"metadata": {"tta_flip": '"yes"'}}, "metadata 'tta_flip' is a str, not a bool"),
    ({"metadata": {"mean": "[0.5, NaN, 0.5]"}}, "metadata 'mean' is not 3 finite numbers"),
    ({"in_type": TensorProto.UINT8}, "input is tensor(uint8)"),
    ({"in_type": TensorProto.FLOAT16}, "input is tensor(float16)"),
    ({"in_shape": ("N", 3, 64, 64)}, "not float (N, 3, 32, 32)"),
    ({"cast_to": TensorProto.INT64}, "output is tensor(int64)"),
    ({"weight": float("nan")}, "gave NaN or infinite scores"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_lying_or_malformed_files_are_one_line_exit_2(tmp_path, image, folder, capsys, changes,
                                                      message, command):
    model = classifier(tmp_path / "m.onnx", **changes)
    given = str(image) if command == "predict" else f"--data={folder}"
    assert main([command, str(model), given]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "nan %" not in err


def endless(path):
    """The tiny classifier's logits passed through a Loop with no trip count whose condition
    stays true: onnxruntime would run it for ever."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    true = numpy_helper.from_array(np.array(True), "true")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"]),
             helper.make_node("Loop", ["", "true", "logits"], ["y"], body=body)]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w, true])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model.metadata_props.add(key="classes", value=NAMES)
    onnx.save(model, str(path))
    return path


@pytest.mark.timeout(60)  # without the check, this run would never end
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_graph_with_an_endless_loop_is_refused_before_it_runs(tmp_path, image, folder,
                                                               capsys, command):
    path = endless(tmp_path / "endless.onnx")
    args = [command, str(path), *([str(image)] if command == "predict"
                                  else ["--data", str(folder)])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the graph holds control flow (Loop)" in err
