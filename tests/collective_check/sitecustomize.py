"""Loaded by every Python process the tests start (tests/conftest.py puts this folder on
PYTHONPATH): once the process imports torch.distributed, each collective checks that its tensors
are on a device that the process group pdc builds on a GPU machine (`group_backend(cuda)`) has a
backend for, and appends what it saw to $PDC_COLLECTIVE_LOG (collective_check.py).

On this CPU every rank computes on the CPU, so the check asks what the GPU run must get right:
that the group a GPU rank joins carries the CPU tensors pdc reduces (an NCCL-only group, as
`init_process_group("nccl")` builds, has no backend for them and the collective fails). A process
that never imports torch.distributed (the language commands) is left alone."""

import importlib.abc
import os
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Installs the check right after torch.distributed has been imported."""

    def find_spec(self, name, path, target=None):
        if name != "torch.distributed":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_install(module, _exec=exec_module):
                    _exec(module)
                    sys.meta_path.remove(self)
                    import collective_check

                    collective_check.install(module)

                spec.loader.exec_module = exec_then_install
                return spec
        return None


if os.environ.get("PDC_COLLECTIVE_LOG"):
    sys.meta_path.insert(0, _AfterImport())
