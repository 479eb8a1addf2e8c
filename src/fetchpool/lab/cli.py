"""``fetchpool lab``: re-measure the threading notebook's claims on this machine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from fetchpool.lab.report import (
    machine_summary,
    print_list,
    print_result,
    print_summary,
    write_report,
)
from fetchpool.lab.scenarios import SCENARIOS, Scenario, resolve, run_scenarios

__all__ = ["lab_command"]


def _choose(names: tuple[str, ...], run_all: bool) -> list[Scenario]:
    if run_all:
        return list(SCENARIOS.values())
    try:
        return resolve(names)
    except KeyError as exc:
        known = ", ".join(SCENARIOS)
        raise click.UsageError(f"unknown scenario {exc.args[0]!r}; choose from: {known}") from exc


@click.command("lab")
@click.argument("names", nargs=-1, metavar="[NAME|NUMBER]...")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@click.option("--all", "run_all", is_flag=True, help="Run every scenario.")
@click.option(
    "--scale",
    type=click.FloatRange(min=0.0, max=10.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiply every duration (1 = the notebook's; 0.1 runs ten times faster).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/index.html with every table and DIR/NAME.svg timelines.",
)
def lab_command(
    names: tuple[str, ...], list_only: bool, run_all: bool, scale: float, report_dir: Path | None
) -> None:
    """Re-measure the claims of the "Threading in Python" notebook and draw each as a timeline.

    \b
    Examples:
      fetchpool lab --list
      fetchpool lab map-order as-completed-order
      fetchpool lab --all --scale 0.1 --report lab-report
    """
    console = Console()
    if list_only or (not names and not run_all):
        print_list(console)
        if not list_only:
            console.print("Run some with [bold]fetchpool lab NAME...[/] or all with --all.")
        return
    chosen = _choose(names, run_all)
    console.print(machine_summary(scale))
    console.print()
    results = run_scenarios(chosen, scale, on_result=lambda r: print_result(console, r))
    if len(results) > 1:
        print_summary(console, results)
    if report_dir is not None:
        index = write_report(results, report_dir, scale=scale)
        console.print(f"report: {index}")
