"""Go: the language's run command and `fission install --lang go` through the allowlist."""

from __future__ import annotations

from fission.core.languages import resolve_language
from fission.core.provision import plan_install
from fission.images.recipes import RECIPES


def test_go_compiles_then_execs_so_the_program_s_exit_code_is_the_run_s() -> None:
    go = resolve_language("golang")
    assert go.name == go.image == "go"
    assert "golang-go" in RECIPES["go"].packages
    script = go.argv[2]
    assert "go build" in script and 'exec "$out/main"' in script
    assert "go run" not in script  # would turn every exit code into 1
    assert go.env["GOCACHE"].startswith("/home/sandbox/")  # on the disk the snapshot keeps
    assert go.env["GOPROXY"] == "off"
    assert 'import "fmt"' in go.warm_up


def test_go_install_fetches_through_the_public_proxy_by_default() -> None:
    plan = plan_install(resolve_language("go"), ["example.com/m@v1.0.0"], "go version")
    assert plan.setup.env == {"GOPROXY": "https://proxy.golang.org"}
    assert plan.setup.network.allows_name("proxy.golang.org", 443)
    assert plan.setup.network.allows_name("sum.golang.org", 443)
    assert not plan.setup.network.allows_name("github.com", 443)
    assert "go get example.com/m@v1.0.0" in plan.setup.code
    assert plan.command.env == plan.setup.env  # the command builds against the same proxy


def test_go_install_from_a_private_proxy_reaches_only_it() -> None:
    plan = plan_install(
        resolve_language("go"), ["example.com/m"], "true", index_url="http://127.0.0.1:8123/"
    )
    assert plan.setup.env == {"GOPROXY": "http://127.0.0.1:8123/", "GOSUMDB": "off"}
    assert plan.setup.network.allows_name("127.0.0.1", 8123)
    assert not plan.setup.network.allows_name("proxy.golang.org", 443)
