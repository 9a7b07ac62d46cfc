"""Totals every test the suite ran and prints "N passed, N failed".

Reads meson's testlog.json files (unit tests, both builds), the fuzz and
image-build lines (PASS/FAIL), and pytest's JUnit XML (integration tests).
Exits non-zero when anything failed.
"""
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

results = sys.argv[1]
passed = failed = 0

for path in glob.glob(os.path.join(results, "unit-*.json")):
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line).get("result")
            if r in ("OK", "EXPECTEDFAIL"):
                passed += 1
            elif r != "SKIP":
                failed += 1

fuzz = os.path.join(results, "fuzz.txt")
if os.path.exists(fuzz):
    with open(fuzz) as f:
        for line in f:
            if line.startswith("PASS"):
                passed += 1
            elif line.startswith("FAIL"):
                failed += 1

xml = os.path.join(results, "integration.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        total = int(s.get("tests", 0))
        bad = int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped = int(s.get("skipped", 0))
        passed += total - bad - skipped
        failed += bad

print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
