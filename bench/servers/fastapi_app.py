"""A tiny FastAPI app for bench/servers.sh (uvicorn).

GET /health -> "ok"; GET /?sleep=MS -> waits MS ms, answers {"pid": N}.
"""
import asyncio
import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()


@app.get("/health", response_class=PlainTextResponse)
async def health():
    return "ok\n"


@app.get("/")
async def root(sleep: int = 0):
    if sleep > 0:
        await asyncio.sleep(min(sleep, 600) / 1000)
    return {"pid": os.getpid()}
