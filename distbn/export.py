"""``export``: a trained network as files that serve without distbn or Horovod, the same at any
worker count.

    PATH-symbol.json   the graph, with MXNet's own BatchNorm: ``SymbolBlock.imports``
    PATH-0000.params   its parameters (``arg:``/``aux:`` names, as ``HybridBlock.export``)
    PATH.onnx          the same graph in ONNX (``mx.onnx.export_model``): a dynamic batch
                       axis, parameters as initializers
    PATH.sha256        the files' SHA-256 (``sha256sum -c`` reads it)

The graph is traced with every batch-norm layer reverted to Gluon's for the time of the trace
(:func:`distbn.convert.swap_batchnorm`, then undone), so what a worker writes does not depend on
how many workers ran: a traced ``SyncBatchNorm`` at 2 workers would hold distbn's exchange.
The running statistics written are the layers' current ones (those prediction uses; after
``update_bn_stats`` the re-estimated ones). Where a layer ignores gamma (``fix_gamma``,
``scale=False``) gamma is written as ones, since ONNX's BatchNormalization has no such flag.

``fold=True`` folds each batch norm that alone reads a convolution's or dense layer's output
into that layer's weight and bias (``w * s``, ``(b - mean) * s + beta``, ``s = gamma /
sqrt(var + eps)``), as serving stacks do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon

from .convert import bn_layers, swap_batchnorm, to_gluon, undo
from .storage import write_checksums, writing


class ExportError(Exception):
    """The network cannot be exported as asked; the message says why and what to do."""


def export(net: gluon.HybridBlock, path, input_shape: Sequence[int], *, onnx: bool = True,
           fold: bool = False) -> list:
    """Writes ``path``-symbol.json, ``path``-0000.params, ``path``.onnx (with ``onnx``) and
    ``path``.sha256 for ``net`` fed one input of ``input_shape`` (its batch size is free in
    the ONNX file). All or nothing: the files are made in a temporary folder beside ``path``
    and moved into place only when every one is complete. Returns the written paths.
    Raises :class:`ExportError` (one line) and :class:`distbn.storage.StorageError`."""
    path = Path(path)
    symbol, params = trace(net)
    if fold:
        symbol, params = fold_batchnorm(symbol, params)
    tmp = path.parent / f".{path.name}.export-{os.getpid()}"
    try:
        with writing(tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        files = _write(symbol, params, tmp / path.name, tuple(input_shape), onnx)
        return _move_into_place(files, path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trace(net: gluon.HybridBlock):
    """(symbol, {'arg:name' | 'aux:name': NDArray on the CPU}) of ``net`` with Gluon's
    batch norm, in MXNet's legacy (non-numpy) operators, which MXNet's ONNX export reads."""
    if not isinstance(net, gluon.HybridBlock):
        raise ExportError(f"{type(net).__name__} is not a HybridBlock: only a hybridizable "
                          "network has a graph to export")
    deferred = [p.name for p in net.collect_params().values() if p._data is None]
    if deferred:
        raise ExportError(f"parameter {deferred[0]} has no value yet (deferred shape): "
                          "initialize the network and run it on one batch before exporting")
    with _as_gluon(net), mx.util.np_array(False), mx.util.np_shape(False):
        ignored_gamma = {bn.gamma.name for bn in bn_layers(net) if bn._kwargs["fix_gamma"]}
        symbol = net(mx.sym.var("data"))
    if isinstance(symbol, (list, tuple)):
        symbol = mx.sym.Group(list(symbol))
    symbol = _unversioned(symbol)
    values = {p.name: p for p in net.collect_params().values()}
    params = {}
    for kind, names in (("arg", symbol.list_arguments()), ("aux", symbol.list_auxiliary_states())):
        for name in names:
            if name == "data":
                continue
            value = values[name]._reduce()  # one copy; every device holds the same values
            params[f"{kind}:{name}"] = mx.nd.ones_like(value) if name in ignored_gamma else value
    return symbol, params


def _unversioned(symbol):
    """``symbol`` with each input's variable version 0. Gluon keeps one symbol variable per
    Parameter, whose version counts the operators that ever updated it in any trace (the
    running statistics: every hybridize, every earlier trace), so without this the file would
    depend on the process's history; a graph that updates each once loads the same."""
    graph = json.loads(symbol.tojson())
    for node in graph["nodes"]:
        node["inputs"] = [[src, out, 0] for src, out, _ in node["inputs"]]
    return mx.sym.load_json(json.dumps(graph))


@contextmanager
def _as_gluon(net):
    """``net`` with Gluon's batch-norm layers while the block runs, then its own again."""
    swaps = []
    swap_batchnorm(net, to_gluon, swaps)
    try:
        yield
    finally:
        undo(swaps)


def _write(symbol, params: dict, stem: Path, input_shape: tuple, onnx: bool) -> list:
    files = [stem.with_name(stem.name + "-symbol.json"), stem.with_name(stem.name + "-0000.params")]
    with writing(files[0]):
        symbol.save(str(files[0]))
    with writing(files[1]):
        mx.nd.save(str(files[1]), params)
    if onnx:
        files.append(stem.with_name(stem.name + ".onnx"))
        _write_onnx(files[0], files[1], input_shape, files[2])
    checksums = stem.with_name(stem.name + ".sha256")
    write_checksums(checksums, files)
    return files + [checksums]


def _write_onnx(symbol_file: Path, params_file: Path, input_shape: tuple, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("the ONNX export needs the onnx package (pip install onnx==1.14.1, "
                          "as launch/install.sh does), or export with onnx=False") from None
    symbol = json.loads(symbol_file.read_text())
    for node in symbol["nodes"]:
        if node["op"] == "BatchNorm" and int(node.get("attrs", {}).get("axis", 1)) != 1:
            raise ExportError(f"{node['name']} normalizes axis {node['attrs']['axis']} "
                              "(channels last): ONNX's BatchNormalization takes channels on "
                              "axis 1; build the network channels-first to export it to ONNX, "
                              "or export with onnx=False (MXNet's files take any axis)")
    batch_free = (None,) + tuple(input_shape[1:])
    try:
        with writing(out):
            mx.onnx.export_model(str(symbol_file), str(params_file), [input_shape], [np.float32],
                                 str(out), dynamic=True, dynamic_input_shapes=[batch_free])
    except (AttributeError, NotImplementedError) as e:  # mx2onnx: no converter for an operator
        raise ExportError(f"ONNX cannot express this network: {str(e).strip()[:300]}; "
                          "export with onnx=False") from None
    model = onnx.load(str(out))
    initialized = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialized]
    del model.graph.input[:]  # parameters only as initializers: onnxruntime can fold them
    model.graph.input.extend(inputs)
    with writing(out):
        onnx.save(model, str(out))


def _move_into_place(files: list, folder: Path) -> list:
    """Renames the files into ``folder``, the checksum file last (a reader that finds it finds
    the rest complete)."""
    placed = []
    for f in files:
        target = folder / f.name
        with writing(target):
            os.replace(f, target)
        placed.append(target)
    return placed


# --- folding batch norm into the layer before it ----------------------------------------

_FOLDABLE = {"Convolution", "FullyConnected"}


def fold_batchnorm(symbol, params: dict):
    """(symbol, params) with each foldable BatchNorm merged into the Convolution or
    FullyConnected whose output only it reads (channels on axis 1, weights' axis 0)."""
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    readers = {}
    for i, node in enumerate(nodes):
        for src, *_ in node["inputs"]:
            readers.setdefault(src, []).append(i)
    for src, *_ in graph["heads"]:
        readers.setdefault(src, []).append(None)
    folded = {}    # BatchNorm node id -> the layer node id it merges into
    new_bias = {}  # layer node id -> the bias variable it gets (it had none)
    for i, node in enumerate(nodes):
        if node["op"] == "BatchNorm" and _foldable(i, nodes, readers):
            folded[i] = layer_id = node["inputs"][0][0]
            bias = _fold_values(nodes[layer_id], node, nodes, params)
            if bias is not None:
                new_bias[layer_id] = bias
    if not folded:
        return symbol, params
    graph = _without(graph, folded, new_bias)
    return mx.sym.load_json(json.dumps(graph)), _used(params, folded, nodes)


def _foldable(bn_id: int, nodes: list, readers: dict) -> bool:
    bn = nodes[bn_id]
    attrs = bn.get("attrs", {})
    layer_id = bn["inputs"][0][0]
    layer = nodes[layer_id]
    flat = layer["op"] != "FullyConnected" or _attr(layer, "flatten", "True") == "True"
    return (layer["op"] in _FOLDABLE and flat and int(attrs.get("axis", 1)) == 1
            and attrs.get("output_mean_var", "False") == "False"
            and _attr(layer, "layout", "None") in ("None", "NCW", "NCHW", "NCDHW")
            and readers.get(layer_id) == [bn_id])


def _attr(node: dict, key: str, default: str) -> str:
    return node.get("attrs", {}).get(key, default)


def _fold_values(layer: dict, bn: dict, nodes: list, params: dict):
    """Puts the folded weight and bias in ``params`` (the bias under the layer's own bias
    name, or ``<layer>_bias`` when it had none); returns that new name, or None."""
    name = lambda entry: nodes[entry[0]]["name"]  # noqa: E731
    gamma, beta, mean, var = (name(e) for e in bn["inputs"][1:5])
    eps = float(bn.get("attrs", {}).get("eps", 1e-3))  # MXNet's operator default
    g = params[f"arg:{gamma}"].asnumpy().astype(np.float64)
    if bn.get("attrs", {}).get("fix_gamma", "True") == "True":
        g = np.ones_like(g)
    scale = g / np.sqrt(params[f"aux:{var}"].asnumpy().astype(np.float64) + eps)
    weight = name(layer["inputs"][1])
    w = params[f"arg:{weight}"].asnumpy()
    has_bias = _attr(layer, "no_bias", "False") == "False"
    b = params[f"arg:{name(layer['inputs'][2])}"].asnumpy() if has_bias else 0.0
    folded_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    folded_b = (b - params[f"aux:{mean}"].asnumpy()) * scale + params[f"arg:{beta}"].asnumpy()
    params[f"arg:{weight}"] = mx.nd.array(folded_w, dtype=w.dtype)
    bias = name(layer["inputs"][2]) if has_bias else f"{layer['name']}_bias"
    params[f"arg:{bias}"] = mx.nd.array(folded_b, dtype=w.dtype)
    return None if has_bias else bias


def _without(graph: dict, folded: dict, new_bias: dict) -> dict:
    """The graph without the folded BatchNorm nodes (their readers read the layer), each
    layer given its bias variable: nodes renumbered, still in topological order."""
    nodes, new_nodes, new_id = graph["nodes"], [], {}
    for i, node in enumerate(nodes):
        if i in folded:
            new_id[i] = new_id[folded[i]]
            continue
        inputs = [[new_id[s], o, v] for s, o, v in node["inputs"]]
        bias = new_bias.get(i)
        if bias is not None:  # the layer had no bias: a variable for it, just before it
            new_nodes.append({"op": "null", "name": bias, "inputs": []})
            inputs.append([len(new_nodes) - 1, 0, 0])
            node.setdefault("attrs", {})["no_bias"] = "False"
        node["inputs"] = inputs
        new_id[i] = len(new_nodes)
        new_nodes.append(node)
    return {"nodes": new_nodes,
            "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
            "heads": [[new_id[s], o, v] for s, o, v in graph["heads"]],
            "attrs": graph.get("attrs", {})}


def _used(params: dict, folded: dict, nodes: list) -> dict:
    """``params`` without the folded layers' gamma, beta and statistics."""
    gone = {nodes[e[0]]["name"] for bn in folded for e in nodes[bn]["inputs"][1:]}
    return {k: v for k, v in params.items() if k.split(":", 1)[1] not in gone}


# --- python -m distbn.export --run-dir DIR ----------------------------------------------

def export_run(run_dir: Path, fold: bool = False) -> list:
    """What the trainer writes when it ends, made again from ``run_dir``'s newest intact
    checkpoint (its config, its parameters: the statistics its last evaluation used)."""
    from . import checkpoint
    from .config import load_config
    from .train import INPUT_SHAPE, build_model

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    ckpt = checkpoint.latest(run_dir / "checkpoints", report=print)
    if ckpt is None:
        raise ExportError(f"{run_dir}/checkpoints holds no intact checkpoint")
    cfg = load_config(str(saved))
    net = build_model(cfg, [mx.cpu()])
    try:
        net.load_parameters(str(ckpt.params), ctx=mx.cpu())
    except mx.base.MXNetError as e:
        raise ExportError(f"cannot load {ckpt.params}: {str(e).strip().splitlines()[0][:200]}") from None
    return export(net, run_dir / "export" / "model", INPUT_SHAPE, fold=fold)


def main(argv=None) -> int:
    from .config import ConfigError
    from .storage import StorageError

    ap = argparse.ArgumentParser(prog="python -m distbn.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a trainer's run directory")
    ap.add_argument("--fold", action="store_true",
                    help="fold each batch norm into the convolution or dense layer before it")
    args = ap.parse_args(argv)
    try:
        files = export_run(Path(args.run_dir), fold=args.fold)
    except (ExportError, ConfigError, StorageError) as e:
        print(f"distbn.export: {e}", file=sys.stderr)
        return 4 if isinstance(e, StorageError) else 2
    print(f"exported {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
