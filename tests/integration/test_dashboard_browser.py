"""The dashboard in a real browser against a running operator: `microvm-blueprint dev` (its own anvil, the
dev contract, the in-memory provider) in one process, headless Chromium on its page, and the customer's
CLI submitting jobs. The page must show the VM appear and change status without a reload; `vms watch`
must see the same changes. Screenshots are kept as test artifacts (their paths are printed)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from microvm_blueprint.procs import Child

from ..browser import chromium, chromium_or_skip
from ..dev_process import CLI, dev_env, start_dev
from ..waiting import until

pytestmark = pytest.mark.chain

ROW = "document.querySelector('tr[data-vm=\"vm-1\"]')"


async def cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *argv], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


async def test_dashboard_follows_jobs_live(tmp_path: Path) -> None:
    chromium_or_skip()
    env = dev_env(tmp_path)
    dev, _, _ = await start_dev(tmp_path, env)
    watcher: Child | None = None
    try:
        api = json.loads((tmp_path / "devnet" / "dev.json").read_text())["api_url"]
        async with chromium(tmp_path / "browser") as page:
            await page.goto(api + "/")
            await until(lambda: page.js("document.getElementById('live').textContent === 'live'"), 30,
                        "the page to be connected to /events")
            assert await page.js(f"{ROW} === null")
            await page.js("window.notReloaded = true")  # gone if the page ever reloads

            submitted = await cli("jobs", "submit", "create_vm", "vm-1", "--timeout", "60", env=env, cwd=tmp_path)
            assert submitted.returncode == 0, (submitted.stdout, submitted.stderr, dev.log_tail())
            assert "result: true" in submitted.stdout
            await until(lambda: page.js(f"{ROW} !== null && {ROW}.dataset.status === 'created'"), 30,
                        "vm-1 to appear as created")

            watcher = await Child.spawn([*CLI, "vms", "watch", "vm-1", "--last", "5"], tmp_path / "watch.log",
                                        env=env, cwd=tmp_path)
            await until(lambda: "vm-1 create -> created call 0" in watcher.log_tail(), 30, "vms watch to print the past")
            until_running = asyncio.create_task(
                cli("vms", "watch", "vm-1", "--until", "running", "--timeout", "60", env=env, cwd=tmp_path)
            )

            started = await cli("jobs", "submit", "start_vm", "vm-1", "--timeout", "60", env=env, cwd=tmp_path)
            assert started.returncode == 0, (started.stdout, started.stderr, dev.log_tail())
            await until(lambda: page.js(f"{ROW}.dataset.status === 'running'"), 30, "vm-1 to turn running on the page")
            assert await page.js("window.notReloaded === true")
            assert await page.js("document.querySelector('[data-fig=\"running\"] b').textContent") == "1"
            # the operator's figures come from /metrics and move with the jobs: create_vm and start_vm ran
            await until(lambda: page.js("document.querySelector('[data-fig=\"jobs-run\"] b')?.textContent === '2'"),
                        30, "the page's job figure to count both jobs")
            assert await page.js("document.querySelector('[data-fig=\"jobs-failed\"] b').textContent") == "0"
            events = await page.js("[...document.querySelectorAll('#events li')].map(li => li.textContent)")
            assert any("start" in e and "running" in e for e in events), events

            done = await asyncio.wait_for(until_running, 60)
            assert (done.returncode, done.stdout.strip()) == (0, "vm-1 is running"), done.stderr
            await until(lambda: "vm-1 start -> running call 1" in watcher.log_tail(), 30, "vms watch to print the start")

            shot = await page.screenshot(tmp_path / "dashboard.png")
            print(f"\ndashboard screenshot: {shot}")
            await page.goto(api + "/#/vm/vm-1")
            await until(lambda: page.js("document.querySelector('[data-vm-page=\"vm-1\"]') !== null && "
                                        "document.querySelectorAll('#events li').length === 2"), 30, "vm-1's page")
            shot = await page.screenshot(tmp_path / "dashboard-vm.png")
            print(f"VM page screenshot: {shot}")
        async with chromium(tmp_path / "phone", width=390, height=844, mobile=True) as phone:
            await phone.goto(api + "/")
            await until(lambda: phone.js(f"{ROW} !== null"), 30, "vm-1 on a phone-sized page")
            # no sideways scrolling on a phone: the table turns into cards
            assert await phone.js("document.documentElement.scrollWidth <= window.innerWidth + 1")
            shot = await phone.screenshot(tmp_path / "dashboard-phone.png")
            print(f"phone screenshot: {shot}")
    finally:
        if watcher is not None:
            await watcher.stop(grace=5)
        code = await dev.stop(grace=30)
    assert code == 0, dev.log_tail()
