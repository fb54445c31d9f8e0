"""The `search` and `visit` tools as an MCP server (the `mcp` package's MCPServer, stdio), so a
trained model can be driven by any MCP client as Jan-nano is.

    python -m data_recipes.tools_mcp --corpus corpus.jsonl --index /tmp/bm25-cache

Same collection, same index cache, same observation text as the in-process tools used in
training (data_recipes.tools); an error observation comes back as a tool result with isError.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_server(toolbox: Any):
    """An MCPServer exposing each tool of `toolbox` (a data_recipes.tools.Toolbox) by name."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from data_recipes.tools import ToolCall

    server = MCPServer("smollm-tools", instructions="Search and read a local document collection.",
                       log_level="WARNING")

    def call(name: str, **arguments) -> str:
        result = toolbox.run(ToolCall(name=name, arguments=arguments))
        if not result.ok:
            raise ToolError(result.observation)  # the client sees isError and the same text
        return result.observation

    # typed signatures: MCPServer derives each tool's input schema from them
    def search(query: str) -> str:
        return call("search", query=query)

    def visit(id: str) -> str:  # noqa: A002 - the argument's name in the schema
        return call("visit", id=id)

    for fn in (search, visit):
        if fn.__name__ in toolbox.tools:
            server.add_tool(fn, name=fn.__name__,
                            description=toolbox.tools[fn.__name__].description,
                            structured_output=False)
    return server


def main(argv: list[str] | None = None) -> int:
    from data_recipes.tools import TOOL_NAMES, ToolsConfig, build_toolbox

    parser = argparse.ArgumentParser(prog="python -m data_recipes.tools_mcp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="jsonl of {id, title, text}")
    parser.add_argument("--index", required=True, help="directory caching the BM25 index")
    parser.add_argument("--tools", default=",".join(TOOL_NAMES))
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--preview-chars", type=int, default=200)
    parser.add_argument("--visit-max-chars", type=int, default=4000)
    args = parser.parse_args(argv)
    try:
        cfg = ToolsConfig(corpus=args.corpus, tools=args.tools.split(","), top_k=args.top_k,
                          preview_chars=args.preview_chars, visit_max_chars=args.visit_max_chars)
        toolbox = build_toolbox(cfg, args.index)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build_server(toolbox).run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
