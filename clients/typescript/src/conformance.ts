/**
 * The scenarios tests/test_polyglot.py runs against the live server, one per invocation. Reads one call from stdin:
 *   {"address", "api_key"?, "rpc": "unary" | "stream", "request": <OpenAI JSON>, "timeout_ms"?, "cancel_after"?,
 *    "metadata"?: {name: value}, "tls"?: {"ca_file", "cert_file"?, "key_file"?}}
 * and prints what came back as OpenAI JSON: {"response"} | {"chunks", "error"?} | {"error"}, each with "replica" (the
 * x-chatwire-replica the call received, or null).
 */
import { readFileSync } from "node:fs";

import type { JsonObject } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";

import {
  CreateChatCompletionResponseSchema,
  CreateChatCompletionStreamResponseSchema,
} from "./gen/chatwire/v1/chat_completion_pb.js";
import { chatRequest, chatwireClient, chatwireError, openaiJson, replica } from "./chatwire.js";

interface Call {
  address: string;
  api_key?: string;
  rpc: "unary" | "stream";
  request: JsonObject;
  timeout_ms?: number;
  cancel_after?: number;
  metadata?: Record<string, string>;
  tls?: { ca_file: string; cert_file?: string; key_file?: string } | null;
}

const call = JSON.parse(readFileSync(0, "utf8")) as Call;
const files = call.tls;
const tls = files ? { caFile: files.ca_file, certFile: files.cert_file, keyFile: files.key_file } : undefined;
const client = chatwireClient(call.address, { apiKey: call.api_key, tls });
const request = chatRequest(call.request);
const controller = new AbortController();
// Where x-chatwire-replica can come from: the reply's headers, its trailers, a failed call's metadata.
let header: Headers | undefined, trailer: Headers | undefined, failure: Headers | undefined;
const options = {
  signal: controller.signal,
  timeoutMs: call.timeout_ms ?? 120_000,
  headers: call.metadata,
  onHeader: (received: Headers) => (header = received),
  onTrailer: (received: Headers) => (trailer = received),
};
const result: JsonObject = {};

try {
  if (call.rpc === "unary") {
    const reply = await client.createChatCompletion(request, options);
    result.response = openaiJson(CreateChatCompletionResponseSchema, reply);
  } else {
    const chunks: JsonObject[] = [];
    result.chunks = chunks;
    for await (const chunk of client.streamChatCompletion(request, options)) {
      if (controller.signal.aborted) continue; // arrived before the abort took effect; no longer wanted
      chunks.push(openaiJson(CreateChatCompletionStreamResponseSchema, chunk));
      if (chunks.length === call.cancel_after) controller.abort();
    }
  }
} catch (thrown) {
  failure = ConnectError.from(thrown).metadata;
  const { code, message, reason, domain, metadata, field, openai } = chatwireError(thrown);
  result.error = { code, message, reason, domain, metadata, field, openai } as JsonObject;
}
result.replica = replica(header, trailer, failure);
console.log(JSON.stringify(result));
