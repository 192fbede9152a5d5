/**
 * A thin helper over chatwire's generated TypeScript client (protobuf-es + Connect's gRPC transport).
 *
 * Requests are written as OpenAI JSON and parsed with the protobuf JSON mapping (`fromJson`), so `content: "Hi"`,
 * tool `parameters` and `tool_choice` need no hand-built Value or Struct; replies are read back as OpenAI JSON the
 * same way (`toJson`), or field by field from the typed messages.
 */
import { readFileSync } from "node:fs";

import { fromJson, toJson, type DescMessage, type JsonObject, type MessageShape } from "@bufbuild/protobuf";
import type { Value } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createAsyncIterable } from "@connectrpc/connect/protocol";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import {
  CreateChatCompletionRequestSchema,
  type CreateChatCompletionRequest,
} from "./gen/chatwire/v1/chat_completion_pb.js";
import { ChatService } from "./gen/chatwire/v1/chat_service_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export { ChatService };

/**
 * The metadata that keys a chat call to a replica: Envoy's gRPC listener cannot read protobuf bodies, so it hashes
 * this header to send a conversation's calls to the replica whose prefix cache holds it.
 */
export const AFFINITY_HEADER = "x-chatwire-affinity";
/** The metadata in every reply that names the replica that served it. */
export const REPLICA_HEADER = "x-chatwire-replica";
// Longer keys are hashed on their first 256 bytes, as at the HTTP edge: the header stays small.
const MAX_AFFINITY_KEY = 256;
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;

/** The PEM files for TLS: the CA that signed the server's certificate, and for mutual TLS a client certificate. */
export interface TlsFiles {
  /** The CA certificate(s) the server's certificate must chain to (instead of Node's built-in roots). */
  caFile: string;
  /** The client certificate chain and its private key, for a server that requires one; both or neither. */
  certFile?: string;
  keyFile?: string;
}

/**
 * A ChatService client for `address` (host:port): plaintext HTTP/2, or TLS with `tls` (the host must be a name or
 * address in the server's certificate). `apiKey` goes out as `authorization`. Chat calls carry their `affinityKey`
 * (see `affinityInterceptor`).
 */
export function chatwireClient(
  address: string,
  options: { apiKey?: string; tls?: TlsFiles } = {},
): Client<typeof ChatService> {
  const interceptors: Interceptor[] = [affinityInterceptor];
  if (options.apiKey) {
    const bearer = `Bearer ${options.apiKey}`;
    interceptors.push((next) => (request) => {
      request.header.set("authorization", bearer);
      return next(request);
    });
  }
  const { tls } = options;
  if (tls && !tls.certFile !== !tls.keyFile) {
    throw new Error("chatwire: a client certificate needs its key, and a key its certificate");
  }
  const baseUrl = `${tls ? "https" : "http"}://${address}`;
  // Node's TLS options, read once here: a missing file fails now rather than at the first call.
  const nodeOptions = tls && {
    ca: readFileSync(tls.caFile),
    cert: tls.certFile ? readFileSync(tls.certFile) : undefined,
    key: tls.keyFile ? readFileSync(tls.keyFile) : undefined,
  };
  // Our own session manager (the transport would make the same one): connectionErrors reads its state.
  const sessionManager = new Http2SessionManager(baseUrl, {}, nodeOptions);
  interceptors.unshift(connectionErrors(sessionManager));
  return createClient(ChatService, createGrpcTransport({ baseUrl, interceptors, sessionManager }));
}

/**
 * Reports a call that failed because its connection did, as gRPC's own clients (and chatwire's Go and Python
 * helpers) do: UNAVAILABLE. connect-node says INTERNAL when the connection cannot be made (e.g. the server's
 * certificate does not verify), and CANCELLED when the server closes it under open calls (e.g. one that requires a
 * client certificate, right after a TLS 1.3 handshake). A call the caller cancelled, or whose deadline passed,
 * keeps its code, as does any error the server sent.
 */
function connectionErrors(sessions: Http2SessionManager): Interceptor {
  const reported = (thrown: unknown, signal: AbortSignal): unknown => {
    if (signal.aborted) return thrown;
    const error = ConnectError.from(thrown);
    const state = sessions.state();
    // The handshake refused: a certificate that does not verify leaves the session in error; a peer's TLS alert
    // ("certificate required") arrives as an OpenSSL error, whatever the session's state by then.
    const tlsRefused = /SSL routines|alert number/.test(error.rawMessage);
    if ((state === "error" || tlsRefused) && error.code === Code.Internal) {
      return new ConnectError(error.rawMessage, Code.Unavailable, error.metadata, [], error);
    }
    if ((state === "closed" || state === "error") && error.code === Code.Canceled) {
      return new ConnectError(`connection closed (${error.rawMessage})`, Code.Unavailable, error.metadata, [], error);
    }
    return thrown;
  };
  return (next) => async (req) => {
    let res;
    try {
      res = await next(req);
    } catch (thrown) {
      throw reported(thrown, req.signal);
    }
    if (!res.stream) return res;
    const messages = res.message;
    return {
      ...res,
      message: (async function* () {
        try {
          yield* messages;
        } catch (thrown) {
          throw reported(thrown, req.signal);
        }
      })(),
    };
  };
}

/**
 * The key a chat request is balanced by: the first of `prompt_cache_key`, `safety_identifier` and `user` (most
 * specific first) that is set and printable ASCII, cut to its first 256 bytes; undefined when none is. It is the HTTP
 * edge's rule for JSON bodies, except that the edge also keys by UTF-8 values: gRPC metadata is printable ASCII only
 * (grpcio and newer grpc-go fail the call otherwise), so here such a value is skipped, as the edge skips one with
 * control characters.
 */
export function affinityKey(request: CreateChatCompletionRequest): string | undefined {
  for (const key of [request.promptCacheKey, request.safetyIdentifier, request.user]) {
    if (key && PRINTABLE_ASCII.test(key)) return key.slice(0, MAX_AFFINITY_KEY);
  }
  return undefined;
}

/**
 * Sends a chat request's `affinityKey` as `x-chatwire-affinity`, unless the call already carries that header (e.g.
 * from the `headers` call option). `chatwireClient` installs it; add it to your own transport's `interceptors`.
 */
export const affinityInterceptor: Interceptor = (next) => async (req) => {
  if (req.method.input !== CreateChatCompletionRequestSchema || req.header.has(AFFINITY_HEADER)) return next(req);
  if (!req.stream) {
    setAffinity(req.header, req.message as CreateChatCompletionRequest);
    return next(req);
  }
  if (req.method.methodKind !== "server_streaming") return next(req);
  // Here a server-streaming call's one request is an iterable that can be read once: read it, then pass it on anew.
  const messages: CreateChatCompletionRequest[] = [];
  for await (const message of req.message) messages.push(message as CreateChatCompletionRequest);
  if (messages.length) setAffinity(req.header, messages[0]);
  return next({ ...req, message: createAsyncIterable(messages) });
};

function setAffinity(header: Headers, request: CreateChatCompletionRequest): void {
  const key = affinityKey(request);
  if (key) header.set(AFFINITY_HEADER, key);
}

/**
 * The replica that served a call, from the first of `metadata` that names one: the reply's headers (`onHeader`),
 * then its trailers (`onTrailer`), or a failed call's `ConnectError.metadata`; null when none does.
 */
export function replica(...metadata: (Headers | undefined)[]): string | null {
  for (const headers of metadata) {
    const name = headers?.get(REPLICA_HEADER);
    if (name) return name;
  }
  return null;
}

/** The gRPC request for an OpenAI Chat Completions request body (unknown keys are an error, as on HTTP). */
export function chatRequest(body: JsonObject): CreateChatCompletionRequest {
  return fromJson(CreateChatCompletionRequestSchema, body);
}

/** A reply (or any chatwire message) as OpenAI's JSON: snake_case keys, zeros printed, nulls where OpenAI has them. */
export function openaiJson<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>): JsonObject {
  return toJson(schema, message, { useProtoFieldName: true, alwaysEmitImplicit: true }) as JsonObject;
}

/** The string in a Value field (`message.content`, a chunk's `finish_reason`); null when JSON null or unset. */
export function text(value: Value | undefined): string | null {
  return value?.kind.case === "stringValue" ? value.kind.value : null;
}

/** What a failed call says: the gRPC status, its google.rpc details, and the OpenAI error body from the trailer. */
export interface ChatwireError {
  /** The gRPC status code (Connect's `Code` uses gRPC's numbers). */
  code: Code;
  message: string;
  /** `ErrorInfo.reason`: the OpenAI error code in upper case, e.g. `MODEL_NOT_FOUND`. */
  reason?: string;
  /** `ErrorInfo.domain` (`chatwire.dev`) and `metadata` (the OpenAI `type`, and `param` when known). */
  domain?: string;
  metadata?: Record<string, string>;
  /** `BadRequest`'s field: the OpenAI `param` of an invalid request. */
  field?: string;
  /** The `x-chatwire-error` trailer: the same `{"error": {...}}` body HTTP clients get. */
  openai?: JsonObject;
}

/** Decodes any error a call threw (a ConnectError, or anything else as UNKNOWN). */
export function chatwireError(thrown: unknown): ChatwireError {
  const error = ConnectError.from(thrown);
  const [info] = error.findDetails(ErrorInfoSchema);
  const [badRequest] = error.findDetails(BadRequestSchema);
  const trailer = error.metadata.get("x-chatwire-error");
  return {
    code: error.code,
    message: error.rawMessage,
    reason: info?.reason,
    domain: info?.domain,
    metadata: info?.metadata,
    field: badRequest?.fieldViolations[0]?.field,
    openai: trailer ? parseBody(trailer) : undefined,
  };
}

function parseBody(trailer: string): JsonObject | undefined {
  try {
    return JSON.parse(trailer) as JsonObject;
  } catch {
    return undefined; // decoding an error must not throw a second one
  }
}
