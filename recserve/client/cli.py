"""``recserve recommend``: ask a running server for one user's recommendations.

The lead registers it on the main app with ``app.command("recommend")(recommend_command)``.
"""

from __future__ import annotations

import typer

from recserve.client.client import RecClient, Recommendation
from recserve.errors import ClientError, RecserveError

__all__ = ["recommend_command", "format_table"]


def format_table(rec: Recommendation) -> str:
    """A readable table: rank, item id, score, title (one row per item)."""
    width = max([len("item_id")] + [len(str(it.item_id)) for it in rec.items])
    explored = any(it.propensity is not None for it in rec.items)
    lines = [f"source: {rec.source}",
             f"{'rank':>4}  {'item_id':>{width}}  {'score':>10}  " + ("propensity  " if explored else "") + "title"]
    for rank, it in enumerate(rec.items, 1):
        prop = f"{it.propensity:>10.4f}  " if explored else ""
        lines.append(f"{rank:>4}  {it.item_id:>{width}}  {it.score:>10.4f}  {prop}{it.title}")
    if not rec.items:
        lines.append("(no items: the user has seen every item)")
    return "\n".join(lines)


def recommend_command(
    user: int = typer.Option(..., "--user", help="Raw user id, as in the data set."),
    k: int = typer.Option(10, "-k", "--k", help="How many items, 1..k-max (set by `export repository`, default 100)."),
    mode: str = typer.Option("ensemble", "--mode", help="ensemble (one call) or pipeline (one call per stage)."),
    protocol: str = typer.Option("grpc", "--protocol", help="grpc or http."),
    url: str | None = typer.Option(None, "--url", help="HOST:PORT (default 127.0.0.1:8001 grpc, :8000 http)."),
    hour: int | None = typer.Option(None, "--hour", help="Hour of the request 0..23 (default: now, UTC)."),
    weekday: int | None = typer.Option(None, "--weekday", help="0 = Monday .. 6 (default: today, UTC)."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds one call may take."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    history: str | None = typer.Option(None, "--history", help="Recent item ids, comma-separated, newest last."),
    segment: str | None = typer.Option(None, "--segment",
                                       help="An unknown user's attribute codes, comma-separated, data set order."),
    exclude: str | None = typer.Option(None, "--exclude", help="Item ids never returned, comma-separated."),
    max_per_genre: int = typer.Option(0, "--max-per-genre", help="At most N items per genre (0 = off)."),
    mmr_lambda: float = typer.Option(1.0, "--mmr-lambda", help="Diversity by MMR, 0..1 (1 = off)."),
    freshness: float = typer.Option(0.0, "--freshness", help="Boost newer items, in score units (0 = off)."),
    explore: str | None = typer.Option(None, "--explore", help="epsilon:E or softmax:T (off by default)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the exploration (default: random)."),
    fallback: str | None = typer.Option(None, "--fallback",
                                        help="The repository's fallback.json: served when no server answers."),
) -> None:
    """Recommend items for one user from a running Triton server."""
    try:
        with RecClient(url, protocol=protocol, timeout=timeout, fallback=fallback) as client:
            rec = client.recommend(user, k=k, hour=hour, weekday=weekday, mode=mode, titles=True,
                                   history=_ids("--history", history), segment=_ids("--segment", segment),
                                   exclude=_ids("--exclude", exclude), max_per_genre=max_per_genre,
                                   mmr_lambda=mmr_lambda, freshness=freshness, explore=explore, seed=seed)
    except RecserveError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(rec.to_json() if as_json else format_table(rec))


def _ids(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ClientError(f"{flag} {text!r}: give integers separated by commas, e.g. 50,172,181") from None
