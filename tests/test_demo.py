"""The demo's reports name the final output directory, not the temporary one they were written in."""

import json

from manzano_edge.demo import retarget_reports


def test_reports_record_the_final_bundle_path(tmp_path):
    tmp, out = tmp_path / ".demo.tmp-abc", tmp_path / "demo"
    (tmp / "validate-w8a8").mkdir(parents=True)
    (tmp / "validate-w8a8" / "report.json").write_text(json.dumps({"bundle": {"path": str(tmp.resolve() / "bundle-w8a8")}}))
    (tmp / "bench").mkdir()
    (tmp / "bench" / "bench.md").write_text(f"bundle {tmp.resolve() / 'bundle'}\n")
    retarget_reports(tmp, out)
    assert json.loads((tmp / "validate-w8a8" / "report.json").read_text())["bundle"]["path"] == str(
        out.resolve() / "bundle-w8a8")
    assert (tmp / "bench" / "bench.md").read_text() == f"bundle {out.resolve() / 'bundle'}\n"
