"""docs/policy-reference.md is generated from the schema; this fails when the two drift."""

import json
import subprocess
import sys
from pathlib import Path

from stagedoor import policydoc
from stagedoor.policyschema import POLICY_SCHEMA, load_schema

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_matches_the_schema():
    result = subprocess.run([sys.executable, "-m", "stagedoor.policydoc", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_check_fails_on_a_stale_document(tmp_path):
    stale = tmp_path / "ref.md"
    stale.write_text(policydoc.render().replace("unknownQuery", "unknownQueries"))
    assert policydoc.main(["--check", "--output", str(stale)]) == 1
    assert policydoc.main(["--output", str(stale)]) == 0
    assert policydoc.main(["--check", "--output", str(stale)]) == 0


def test_every_route_key_is_documented():
    text = (ROOT / "docs" / "policy-reference.md").read_text()
    route = load_schema(POLICY_SCHEMA)["$defs"]["route"]["properties"]
    for key in route:
        assert f"| `{key}` |" in text, key


def test_the_schema_is_valid_json_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(json.loads(POLICY_SCHEMA.read_text()))


def test_readme_and_docs_showing_policies_link_the_reference():
    readme = (ROOT / "README.md").read_text()
    assert "docs/policy-reference.md" in readme
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text()
        if doc.name != "policy-reference.md" and "\nroutes:" in text:
            assert "policy-reference.md" in text, doc.name
