"""Print the names of asyncspade's dependencies (runtime and test extras) without their version ranges, torch excepted
(it stays on the CPU wheel on disk): what `make test-latest` upgrades to their newest releases."""
import pathlib
import re
import tomllib

project = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
names = [re.match(r"[A-Za-z0-9_.\-]+", d).group(0) for d in deps]
print(" ".join(n for n in names if n.lower() != "torch"))
