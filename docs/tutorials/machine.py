"""The first line of a tutorial's recorded output: which machine and when (figures are per machine)."""

import datetime
import os
import platform
from pathlib import Path

info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
lines = dict(line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)
cpu = lines.get("model name\t", platform.processor()).strip()
flags = set(lines.get("flags\t\t", "").split())
shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
print(f"# {datetime.date.today()} on {cpu}, {os.cpu_count()} cores ({' '.join(shown) or 'no AVX2'}), "
      f"Python {platform.python_version()}")
