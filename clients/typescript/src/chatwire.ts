/**
 * A thin helper over chatwire's generated TypeScript client (protobuf-es + Connect's gRPC transport).
 *
 * Requests are written as OpenAI JSON and parsed with the protobuf JSON mapping (`fromJson`), so `content: "Hi"`,
 * tool `parameters` and `tool_choice` need no hand-built Value or Struct; replies are read back as OpenAI JSON the
 * same way (`toJson`), or field by field from the typed messages.
 */
import { fromJson, toJson, type DescMessage, type JsonObject, type MessageShape } from "@bufbuild/protobuf";
import type { Value } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import {
  CreateChatCompletionRequestSchema,
  type CreateChatCompletionRequest,
} from "./gen/chatwire/v1/chat_completion_pb.js";
import { ChatService } from "./gen/chatwire/v1/chat_service_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

export { ChatService };

/** A ChatService client for `address` (host:port, plaintext HTTP/2); `apiKey` goes out as `authorization`. */
export function chatwireClient(address: string, options: { apiKey?: string } = {}): Client<typeof ChatService> {
  const interceptors: Interceptor[] = [];
  if (options.apiKey) {
    const bearer = `Bearer ${options.apiKey}`;
    interceptors.push((next) => (request) => {
      request.header.set("authorization", bearer);
      return next(request);
    });
  }
  return createClient(ChatService, createGrpcTransport({ baseUrl: `http://${address}`, interceptors }));
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
