"""A short tour of the embedded store: log an artifact twice, use it, browse the store.

Run it from anywhere: it works in a temporary folder and prints what happened.
"""

import tempfile
from pathlib import Path

import tessera

work = Path(tempfile.mkdtemp(prefix="tessera-quickstart-"))
store = work / ".tessera"
data = work / "data"
data.mkdir()
for i in range(3):
    (data / f"sample{i}.txt").write_text(f"sample {i}\n")

with tessera.init(project="quickstart", name="prepare", config={"seed": 0}, dir=store) as run:
    artifact = tessera.Artifact("samples", type="dataset", description="three text files")
    artifact.add_dir(data)
    v0 = run.log_artifact(artifact, aliases=["golden"])
    print(f"logged {v0.spec}: {v0.file_count} files, {v0.size} bytes, digest {v0.digest[:12]}…")
    again = run.log_artifact(artifact)
    print(f"logging the same files again returns {again.spec} (nothing new stored)")

with tessera.init(project="quickstart", name="train", dir=store) as run:
    samples = run.use_artifact("samples:golden")
    print(f"{run.name} uses {samples.spec}: {samples.read_bytes('sample1.txt')!r}")
    for step in range(3):
        run.log({"loss": 1.0 / (step + 1)})
    folder = samples.download(work / "downloaded")
    print(f"downloaded to {folder}: {sorted(p.name for p in folder.iterdir())}")

with tessera.open_store(store) as browser:
    lineage = browser.lineage("quickstart/samples:v0")
    print("logged by:", [r.name for r in lineage["logged"]], "used by:", [r.name for r in lineage["used"]])
    print("runs:", [(r.name, r.status, r.summary) for r in browser.runs("quickstart")])

print(f"\nBrowse it yourself:\n  tessera ls --dir {store}\n  tessera ls quickstart --dir {store}\n"
      f"  tessera show quickstart/samples:v0 --dir {store}\n  tessera verify --dir {store}")
