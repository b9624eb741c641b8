"""`rwkv-chat`: an interactive chat REPL over the SDK, with streaming output and resumable sessions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rwkv_serve_client._core import tls_credentials
from rwkv_serve_client.errors import RWKVError, SessionNotFoundError
from rwkv_serve_client.sync import RWKVClient
from rwkv_serve_client.types import Session, TurnResult

app = typer.Typer(add_completion=False, help=__doc__)

HELP = """commands: /new (new session)  /fork (branch this session)  /session (show it)  /quit
Ctrl-C while the model writes stops the turn (the session keeps its state from before the turn)."""


def _sampling(temperature: Optional[float], top_p: Optional[float], top_k: Optional[int],
              max_tokens: Optional[int], seed: Optional[int]) -> dict[str, Any]:
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_tokens": max_tokens, "seed": seed}
    return {k: v for k, v in values.items() if v is not None}


class ChatREPL:
    """The REPL's state: one client, the current session, and where to print."""

    def __init__(self, rwkv: RWKVClient, console: Console, sampling: dict[str, Any]) -> None:
        self.rwkv = rwkv
        self.console = console
        self.sampling = sampling
        self.session: Session | None = None

    def open(self, session_id: str | None, model: str | None, system: str, template: str) -> None:
        if session_id:
            self.session = self.rwkv.get_session(session_id)
            self.console.print(f"[dim]resumed session[/] [bold]{self.session.session_id}[/] "
                               f"[dim](model {escape(self.session.model)}, {self.session.turns} turns so far)[/]")
            return
        models = self.rwkv.list_models()
        if model is None:
            if not models:
                raise typer.BadParameter("the deployment serves no model (is a worker running?)")
            model = models[0].id
        info = next((m for m in models if m.id == model), None)
        if info is not None and info.random_init:
            self.console.print(f"[yellow]model {escape(model)} is RANDOM-INIT: its replies are gibberish "
                               "(start the stack with --model PATH for a real one)[/]")
        self.session = self.rwkv.create_session(model, template=template, system_prompt=system)
        self._announce("new session")

    def _announce(self, what: str) -> None:
        assert self.session is not None
        self.console.print(f"[dim]{what}[/] [bold]{self.session.session_id}[/] [dim](model "
                           f"{escape(self.session.model)}; resume with: rwkv-chat --session "
                           f"{self.session.session_id})[/]")

    def command(self, line: str) -> bool:
        """Runs a /command; False when the REPL should end."""
        assert self.session is not None
        name = line.split()[0].lower()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/new":
            self.session = self.rwkv.create_session(self.session.model, template=self.session.template,
                                                    system_prompt=self.session.system_prompt)
            self._announce("new session")
        elif name == "/fork":
            self.session = self.rwkv.fork_session(self.session.session_id)
            self._announce("forked into")
        elif name == "/session":
            s = self.rwkv.get_session(self.session.session_id)
            self.console.print(f"{s.session_id}: model {escape(s.model)}, {s.turns} turns, {s.state_tokens} tokens "
                               f"in the state, version {s.state_version}")
        else:
            self.console.print(HELP)
        return True

    def turn(self, text: str) -> TurnResult | None:
        """Streams one reply; Ctrl-C stops it."""
        assert self.session is not None
        self.console.print("[bold cyan]Assistant:[/] ", end="")
        result = None
        stream = self.rwkv.chat(self.session.session_id, text, **self.sampling)
        try:
            for item in stream:
                if isinstance(item, TurnResult):
                    result = item
                else:
                    self.console.out(item, end="", highlight=False)
                    self.console.file.flush()
        except KeyboardInterrupt:
            stream.close()  # cancels the turn on the server
            self.console.print("\n[dim](stopped)[/]")
            return None
        self.console.print()
        if result is not None:
            self.console.print(f"[dim]({result.usage.generated_tokens} tokens, {result.stop_reason.name.lower()}, "
                               f"state v{result.state_version})[/]")
        return result

    def loop(self) -> None:
        self.console.print(f"[dim]{HELP}[/]")
        while True:
            try:
                line = self.console.input("[bold green]You:[/] ")
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                self.turn(line)
            except RWKVError as e:
                self.console.print(f"[red]{escape(str(e))}[/]")


@app.command()
def main(
    target: str = typer.Option("127.0.0.1:50051", "--target", "-t", help="front address host:port",
                               envvar="RWKV_TARGET"),
    session: Optional[str] = typer.Option(None, "--session", "-s", help="resume this session id"),
    model: Optional[str] = typer.Option(None, "--model", help="model id for a new session (default: the first)"),
    system: str = typer.Option("", "--system", help="system prompt of a new session"),
    template: str = typer.Option("chat", "--template", help="chat, one-state or raw"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RWKV_API_KEY"),
    tls: bool = typer.Option(False, "--tls", help="TLS to the front, verified against the system's CAs"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", envvar="RWKV_TLS_CA",
                                          help="TLS to the front, verified against this CA certificate (PEM)"),
    message: list[str] = typer.Option([], "--message", "-m",
                                      help="send these messages in order and exit (no REPL)"),
) -> None:
    """Chat with an rwkv-serve deployment."""
    console = Console(highlight=False)
    credentials = tls_credentials(tls_ca) if tls or tls_ca else None
    with RWKVClient(target, api_key=api_key, credentials=credentials) as rwkv:
        repl = ChatREPL(rwkv, console, _sampling(temperature, top_p, top_k, max_tokens, seed))
        try:
            repl.open(session, model, system, template)
            if message:
                for text in message:
                    console.print(f"[bold green]You:[/] {escape(text)}")
                    if text.startswith("/"):
                        if not repl.command(text):
                            break
                    else:
                        repl.turn(text)
                return
        except SessionNotFoundError:
            console.print(f"[red]session {escape(session or '')} does not exist (deleted or expired)[/]")
            raise typer.Exit(1) from None
        except RWKVError as e:
            console.print(f"[red]{escape(target)}: {escape(str(e))}[/]")
            raise typer.Exit(1) from None
        repl.loop()


def run() -> None:
    """Console script entry point."""
    app(prog_name="rwkv-chat")


if __name__ == "__main__":
    sys.exit(run())
