"""`medvit bench models`: the table of every volume net, on tiny settings (no timing asserted)."""

import json

import pytest
import torch

from medvit.config import ModelConfig
from medvit.nets import NETS, build_net
from pipelines.bench import models as bench_models
from pipelines.bench.models import COLUMNS, PAPER, Paper, count_flops, format_table, run
from pipelines.cli import main

TINY = {
    "unetr": Paper(options={"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, out_channels=3,
                   window=(32, 32, 48), monai="UNETR"),
    "unet": Paper(options={"features": [4, 4, 8, 8, 16, 4]}, out_channels=3, window=(32, 32, 32)),
}


def test_table_of_tiny_nets_counts_parameters_and_flops():
    res = run(["unetr", "unet"], papers=TINY, window=(32, 32, 32), repeats=1, threads=2)
    rows = {r["net"]: r for r in res["rows"]}
    for name, paper in TINY.items():
        net = build_net(ModelConfig(name=name, in_channels=1, out_channels=3, roi_size=(32, 32, 32), options=paper.options))
        assert rows[name]["params"] == sum(p.numel() for p in net.parameters())
        assert set(rows[name]["ms_per_window"]) == {"1", "2"} and rows[name]["peak_rss"] > 0
    r = rows["unetr"]
    # MONAI's own UNETR with the same configuration: the registry adds nothing
    assert r["reference"]["params"] == r["params"] and r["reference"]["gflops"] == r["gflops"]
    assert set(r["gflops"]) == {"32x32x32", "32x32x48"}  # the common window and the paper window
    assert r["gflops"]["32x32x48"] > r["gflops"]["32x32x32"] > 0
    assert set(rows["unet"]["gflops"]) == {"32x32x32"} and "reference" not in rows["unet"]
    table = format_table(res).splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("| net"))
    assert [c.strip() for c in table[head].strip("|").split("|")] == list(COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[head + 2:]]
    assert [b[0] for b in body] == ["unetr", "unet"] and all(len(b) == len(COLUMNS) for b in body)
    assert body[0][1] == body[0][2] == f"{r['params'] / 1e6:.2f}"
    assert body[1][2] == "-" and body[1][5] == "32x32x32" and body[1][6] == "-"


def test_deep_supervision_net_counts_flops_with_and_without_its_heads():
    tiny = Paper(options={"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 4],
                          "deep_supervision": True}, out_channels=3, window=(16, 32, 32),
                 figures={"params": 1.0, "gflops": {"16x32x32": 1.0}})
    res = run(["dformer"], papers={"dformer": tiny}, window=(16, 32, 32), repeats=1, threads=1)
    r = res["rows"][0]
    # the 1/2 and 1/4 heads run in training only: they add FLOPs and parameters there
    assert r["gflops_ds"]["16x32x32"] > r["gflops"]["16x32x32"] > 0
    assert r["params"] > r["params_no_ds"]
    assert r["reference"]["source"] == "official code"
    row = format_table(res).splitlines()[-1]
    assert "with DS heads" in row and "without DS heads" in row


def test_transunet3d_rows_both_decoders_and_the_estimate_label():
    tiny = {"strides": [1, 2, 2, 2], "base_features": 4, "max_features": 16, "vit_layers": 1, "vit_hidden": 16,
            "vit_heads": 2, "vit_mlp": 32}
    papers = {"transunet3d": Paper(options=tiny, out_channels=3, window=(16, 16, 16), figures={"params": 117e6},
                                   source="estimate"),
              "transunet3d (mask transformer)": Paper(
                  options={**tiny, "decoder": "mask_transformer", "num_queries": 4, "query_hidden": 12,
                           "query_heads": 2, "query_ffn": 24, "query_layers": 2}, out_channels=3, window=(16, 16, 16))}
    res = run(["transunet3d"], papers=papers, window=(16, 16, 16), repeats=1, threads=1)
    enc, dec = res["rows"]
    assert enc["net"] == "transunet3d" and dec["net"] == "transunet3d (mask transformer)"
    assert dec["params"] > enc["params"] and dec["gflops"]["16x16x16"] > 0
    assert enc["reference"]["source"] == "estimate" and "reference" not in dec
    lines = format_table(res).splitlines()
    assert lines[-2].endswith("| estimate |") and lines[-1].startswith("| transunet3d (mask transformer) |")


def test_input_channels_of_the_paper_reach_the_net_and_its_window():
    # bpMRI: three channels in (T2W, ADC, HBV); the stem's weights and FLOPs see all three
    opts = {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 6], "feature_size": 8, "stem_stride": 2}
    tiny = Paper(options=opts, in_channels=3, out_channels=2, window=(32, 32, 32))
    r = run(["cswin_unet3d"], papers={"cswin_unet3d": tiny}, window=(32, 32, 32), repeats=1, threads=1)["rows"][0]

    def build(c):
        return lambda: build_net(ModelConfig(name="cswin_unet3d", in_channels=c, out_channels=2, roi_size=(32, 32, 32),
                                             options=opts))

    assert r["in_channels"] == 3 and r["params"] == sum(p.numel() for p in build(3)().parameters())
    assert r["gflops"]["32x32x32"] * 1e9 == pytest.approx(count_flops(build(3), (32, 32, 32), in_channels=3)[0])
    assert count_flops(build(3), (32, 32, 32), in_channels=3)[0] > count_flops(build(1), (32, 32, 32))[0]


def test_flops_count_attention_on_meta_and_on_the_cpu_alike():
    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(1, 4)  # one input channel to 4

        def forward(self, x):
            t = self.proj(x.flatten(2).transpose(1, 2))[:, None]  # (1, 1, tokens, 4)
            return torch.nn.functional.scaled_dot_product_attention(t, t, t)

    tokens = 2 * 2 * 3
    expect = 2 * tokens * 1 * 4 + 2 * (2 * tokens * tokens * 4)  # projection, then QK^T and AV
    assert count_flops(Attend, (2, 2, 3))[0] == expect

    class CpuOnly(Attend):
        def forward(self, x):
            if x.device.type == "meta":
                raise NotImplementedError("no meta kernel")
            return super().forward(x)

    assert count_flops(CpuOnly, (2, 2, 3)) == (expect, "cpu")


def test_paper_table_covers_the_registered_nets_and_dformer():
    assert set(NETS.names()) <= set(PAPER)
    assert PAPER["dformer"].window == (64, 128, 128) and PAPER["dformer"].figures["params"] == 50.56e6
    assert PAPER["cswin_unet3d"].in_channels == 3 and PAPER["cswin_unet3d"].options == {}  # its defaults
    assert PAPER["unetr"].options == {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}
    assert PAPER["transunet3d"].source.startswith("estimate") and PAPER["transunet3d"].figures["params"] == 117e6


def test_cli_writes_json_and_refuses_an_unknown_net(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_run(names, *, repeats, threads, on_row):
        seen.append((names, repeats, threads))
        res = {"window": [96, 96, 96], "repeats": repeats, "threads": 2, "rows": []}
        on_row(res)
        return res

    monkeypatch.setattr(bench_models, "run", fake_run)
    monkeypatch.setattr("pipelines.bench.engine.machine", lambda: "test box")
    out = tmp_path / "models.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "models", "--nets", "unetr,unet", "--repeats", "1", "--json", str(out)])
    assert done.value.code == 0 and seen == [(["unetr", "unet"], 1, None)]
    assert json.loads(out.read_text())["machine"] == "test box"
    assert "| net | params M |" in capsys.readouterr().out
    monkeypatch.undo()
    with pytest.raises(SystemExit) as done:
        main(["bench", "models", "--nets", "unetr,nonet"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "\n" not in err and "'nonet' not registered" in err
