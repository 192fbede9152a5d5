/**
 * chatwire over gRPC from TypeScript: one reply, then the same conversation streamed.
 *
 *   node dist/example.js "Say hello."      (CHATWIRE_GRPC=host:port, default 127.0.0.1:50050; CHATWIRE_API_KEY)
 *
 * With CHATWIRE_CA_FILE it speaks TLS, and with CHATWIRE_CLIENT_CERT_FILE and CHATWIRE_CLIENT_KEY_FILE mutual TLS.
 */
import { randomUUID } from "node:crypto";

import { Code } from "@connectrpc/connect";

import { chatRequest, chatwireClient, chatwireError, text } from "./chatwire.js";

const caFile = process.env.CHATWIRE_CA_FILE;
const certFile = process.env.CHATWIRE_CLIENT_CERT_FILE;
const keyFile = process.env.CHATWIRE_CLIENT_KEY_FILE;
// A client certificate without a CA would otherwise go unused over plaintext.
if (!caFile && (certFile || keyFile)) {
  console.error("a client certificate needs CHATWIRE_CA_FILE too");
  process.exit(1);
}
const client = chatwireClient(process.env.CHATWIRE_GRPC ?? "127.0.0.1:50050", {
  apiKey: process.env.CHATWIRE_API_KEY,
  tls: caFile ? { caFile, certFile, keyFile } : undefined,
});
// The request is OpenAI's JSON; fromJson fills the Value and Struct fields. Both calls below share the conversation,
// so they share a prompt_cache_key: the client sends it as x-chatwire-affinity metadata, and behind Envoy's gRPC
// listener the second call finds its prefix cached on the same replica.
const body = {
  model: "smollm2-135m-instruct",
  messages: [{ role: "user", content: process.argv[2] ?? "Say hello." }],
  max_tokens: 48,
  prompt_cache_key: `example-${randomUUID()}`,
};

try {
  // A deadline travels as grpc-timeout: the server stops work for a caller that has given up.
  const reply = await client.createChatCompletion(chatRequest(body), { timeoutMs: 60_000 });
  console.log(text(reply.choices[0].message?.content));

  // Ctrl-C aborts the signal: the RPC is cancelled and the server frees the sequence at once.
  const controller = new AbortController();
  process.once("SIGINT", () => controller.abort());
  const stream = client.streamChatCompletion(chatRequest({ ...body, stream_options: { include_usage: true } }), {
    signal: controller.signal,
    timeoutMs: 60_000,
  });
  for await (const chunk of stream) {
    for (const choice of chunk.choices) process.stdout.write(choice.delta?.content ?? "");
    if (chunk.usage) console.log(`\n(${chunk.usage.completionTokens} tokens)`);
  }
} catch (thrown) {
  // e.g. NotFound MODEL_NOT_FOUND, or InvalidArgument with the field at fault.
  const error = chatwireError(thrown);
  console.error(`${Code[error.code]} ${error.reason ?? ""} ${error.field ?? ""}: ${error.message}`);
  if (error.openai) console.error(`x-chatwire-error: ${JSON.stringify(error.openai)}`);
  process.exitCode = 1;
}
