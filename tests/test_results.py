"""benchmarks.results: a block is rewritten in place, every other byte kept; its header is measured."""

import os
import re
import subprocess

import pytest

from benchmarks import results


def test_a_block_is_replaced_and_nothing_else():
  begin, end = results.markers("b")
  other_begin, other_end = results.markers("c")
  content = f"# R\n\nintro\n{begin}\nold\n{end}\nbetween\n{other_begin}\nkeep\n{other_end}\ntail\n"
  assert results.replace_block(content, "b", "new\n", "B") == content.replace("\nold\n", "\nnew\n")


def test_a_missing_block_is_appended_under_its_title():
  assert results.replace_block("# R\n", "b", "text", "Title") == (
      "# R\n\n## Title\n\n<!-- b:begin -->\ntext\n<!-- b:end -->\n")


def test_a_block_without_its_end_marker_is_refused():
  with pytest.raises(ValueError, match="end marker"):
    results.replace_block("<!-- b:begin -->\nold\n", "b", "new", "B")


def test_publish_writes_the_measured_header(tmp_path):
  path = tmp_path / "R.md"
  results.publish(str(path), "b", "| a |", "B", wall_s=125)
  text = path.read_text()
  header = text.split("<!-- b:begin -->\n")[1].splitlines()[0]
  pattern = r"_`python .+` · \d+ CPU cores \(\w+\).* · commit .+ · \d{4}-\d\d-\d\d · wall time 2 min 5 s_"
  assert re.fullmatch(pattern, header), header
  results.publish(str(path), "b", "| b |", "B", wall_s=3)
  assert "| a |" not in path.read_text() and path.read_text().count("<!-- b:begin -->") == 1
  results.publish("", "b", "x", "B")  # no file: nothing written, no error


def test_the_header_names_no_local_change_when_the_tree_is_clean(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a repository whose only tracked file is the results file itself
  for command in (["git", "init", "-q"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                                                   "--allow-empty", "-m", "init"]):
    subprocess.run(command, check=True)
  (tmp_path / "R.md").write_text("# R\n")
  subprocess.run(["git", "add", "R.md"], check=True)
  subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "r"], check=True)
  results.publish("R.md", "b", "x", "B")
  assert "local changes" not in (tmp_path / "R.md").read_text()


def test_the_commit_counts_code_changes_not_benchmark_outputs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  git = lambda *args: subprocess.run(["git", *args], check=True, capture_output=True)
  git("init", "-q")
  os.makedirs("benchmarks/plots")
  for path in ("benchmarks/RESULTS.md", "benchmarks/plots/a.png", "benchmarks/plots/é.png", "code.py"):
    with open(path, "w") as f:
      f.write("0")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
  head = results.commit()
  for path in ("benchmarks/RESULTS.md", "benchmarks/plots/é.png"):  # written by benchmarks (a name git quotes)
    with open(path, "w") as f:
      f.write("1")
  assert results.commit() == head
  git("mv", "benchmarks/plots/a.png", "benchmarks/plots/b.png")  # staged, renamed
  assert results.commit() == head
  with open("code.py", "w") as f:
    f.write("1")
  assert results.commit() == f"{head} + local changes to code.py"
