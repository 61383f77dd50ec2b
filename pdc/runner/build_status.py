"""A build directory's bookkeeping: `stages.json` (what this invocation did with each stage),
the lock a run holds while it writes, the clean-up of what an interrupted run left behind, and
training stages' persistent work directories. Mixed into `pdc.runner.build.Build`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from pdc.files import remove_temp_leftovers, write_json


STAGES_FILE = "stages.json"
BUILD_LOCK = ".pdc-build.lock"  # held while a run writes into the build directory


class BuildStatus:
    """Stage statuses, leftovers and work directories (part of `Build`)."""

    def log_status(self, name: str, status: str, seconds: Optional[float] = None,
                    message: Optional[str] = None) -> None:
        """`stages.json`: what this invocation did with each stage (running, done, failed, skipped, shared)."""
        path = self.out / STAGES_FILE
        data = self.statuses()
        data[name] = {"status": status, **({"seconds": seconds} if seconds is not None else {}),
                      **({"message": message} if message else {})}
        write_json(path, data)

    def statuses(self) -> dict:
        try:
            data = json.loads((self.out / STAGES_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def clean_leftovers(self) -> None:
        """Remove what an interrupted run left behind (staging directories, temporary files;
        never `<stage>.work/` checkpoints) and say so in one line."""
        if not self.out.is_dir():
            return
        removed = remove_temp_leftovers(self.out, recurse=[p for p in self.out.glob("*.work") if p.is_dir()])
        statuses = self.statuses()
        interrupted = [n for n, v in statuses.items()
                       if isinstance(v, dict) and v.get("status") == "running" and n in self.graph.nodes]
        if not removed and not interrupted:
            return
        what = f"removed {', '.join(str(p.relative_to(self.out)) for p in removed)}" if removed else "nothing to remove"
        if not interrupted:
            print(f"[pdc] an earlier run was interrupted: {what}")
            return
        fates = []
        for n in interrupted:
            if self.done(n):
                fates.append(f"{n} had finished")
            elif (self.out / f"{n}.work" / "checkpoints" / "resume.json").exists():
                fates.append(f"{n} resumes from its last checkpoint")
            else:
                fates.append(f"{n} runs again")
            statuses[n] = {"status": "interrupted"}
        write_json(self.out / STAGES_FILE, statuses)
        print(f"[pdc] the last run was interrupted during {', '.join(interrupted)}: {what}; {', '.join(fates)}")

    def work_dir(self, name: str) -> Path:
        """Persistent checkpoints of a training stage; wiped when the stage's key changes."""
        work = self.out / f"{name}.work"
        key_file = work / "key"
        if work.exists() and (not key_file.exists() or key_file.read_text() != self.stage_key(name)):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(self.stage_key(name))
        return work
