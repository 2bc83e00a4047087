"""bakgrab's benchmark harness: ``python -m tests.bench.run [--quick]``.

It generates a deterministic tree, runs bakgrab end to end, bare rsync over
ssh, rsnapshot and borg against it on this machine (loopback only), and
writes ``results.json`` and ``results.md``. See ``docs/benchmarks.md``.
"""
