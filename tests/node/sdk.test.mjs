// The official OpenAI Node SDK against chatwire's real stack (real Envoy, real model). Run by
// tests/test_client_node.py, one `node --test --test-name-pattern` per case; by hand:
//   CHATWIRE_BASE_URL=http://127.0.0.1:8080/v1 node --test tests/node/sdk.test.mjs
import assert from "node:assert/strict";
import { test } from "node:test";

import OpenAI, { APIUserAbortError } from "openai";
import { LengthFinishReasonError } from "openai/core/error";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const BASE_URL = process.env.CHATWIRE_BASE_URL;
const MODEL = process.env.CHATWIRE_MODEL ?? "smollm2-135m-instruct";
if (!BASE_URL) throw new Error("set CHATWIRE_BASE_URL, e.g. http://127.0.0.1:8080/v1");

const client = new OpenAI({ baseURL: BASE_URL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
const HELLO = [{ role: "user", content: "Say hello in one short sentence." }];
const FINISHED = ["stop", "length"];

function assertUsage(usage, maxTokens) {
  assert.ok(usage, "usage missing");
  assert.ok(usage.prompt_tokens > 0, `prompt_tokens ${usage.prompt_tokens}`);
  assert.ok(
    usage.completion_tokens > 0 && usage.completion_tokens <= maxTokens,
    `completion_tokens ${usage.completion_tokens} not in 1..${maxTokens}`,
  );
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, "total_tokens != prompt + completion");
}

test("unary completion", async () => {
  const completion = await client.chat.completions.create({ model: MODEL, messages: HELLO, max_tokens: 24 });
  assert.equal(completion.object, "chat.completion");
  assert.match(completion.id, /^chatcmpl-/);
  assert.equal(completion.model, MODEL);
  assert.ok(Number.isInteger(completion.created), `created ${completion.created} is not an integer`);
  assert.ok(Math.abs(Date.now() / 1000 - completion.created) < 600, `created ${completion.created} is not now`);
  assert.equal(completion.choices.length, 1);
  const [choice] = completion.choices;
  assert.equal(choice.index, 0);
  assert.equal(choice.message.role, "assistant");
  assert.ok(choice.message.content?.trim(), `no assistant text: ${JSON.stringify(choice.message)}`);
  assert.ok(FINISHED.includes(choice.finish_reason), `finish_reason ${choice.finish_reason}`);
  assertUsage(completion.usage, 24);
});

test("for await stream with usage", async () => {
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: HELLO,
    max_tokens: 16,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.ok(chunks.length >= 3, `only ${chunks.length} chunks`);
  assert.ok(chunks.every((c) => c.object === "chat.completion.chunk"), "a chunk is not a chat.completion.chunk");
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1, "chunks carry different ids");
  assert.ok(chunks.every((c) => c.model === MODEL), "a chunk names another model");
  assert.equal(chunks[0].choices[0].delta.role, "assistant");
  const withChoices = chunks.filter((c) => c.choices.length > 0);
  const text = withChoices.map((c) => c.choices[0].delta.content ?? "").join("");
  assert.ok(text.trim(), "the deltas joined give no text");
  const finishing = withChoices.filter((c) => c.choices[0].finish_reason);
  assert.equal(finishing.length, 1, `${finishing.length} chunks carry a finish_reason`);
  assert.equal(finishing[0], withChoices.at(-1), "the finish_reason is not in the last choice chunk");
  assert.ok(FINISHED.includes(finishing[0].choices[0].finish_reason));
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, [], "the usage chunk has choices");
  assertUsage(last.usage, 16);
  assert.ok(chunks.slice(0, -1).every((c) => !c.usage), "usage before the last chunk");
});

test("stream helper", async () => {
  const runner = client.chat.completions.stream({ model: MODEL, messages: HELLO, max_tokens: 24 });
  let deltas = "";
  let done = null;
  runner.on("content", (delta) => {
    deltas += delta;
  });
  runner.on("content.done", (event) => {
    done = event.content;
  });
  const final = await runner.finalChatCompletion();
  const [choice] = final.choices;
  assert.ok(choice.message.content?.trim(), "finalChatCompletion() has no text");
  assert.equal(deltas, choice.message.content, "content events do not add up to the final text");
  assert.equal(done, choice.message.content, "content.done differs from the final text");
  assert.equal(await runner.finalContent(), choice.message.content);
  assert.equal(choice.message.role, "assistant");
  assert.ok(FINISHED.includes(choice.finish_reason), `finish_reason ${choice.finish_reason}`);
  assert.equal(final.model, MODEL);
});

test("parse with zod response format", async () => {
  const Review = z.object({
    product: z.string().max(20),
    stars: z.number().int().min(1).max(5),
    quantity: z.number().int(), // zod 4 writes minimum/maximum (the safe-integer range) for a plain .int()
    verdict: z.enum(["good", "bad", "mixed"]),
  });
  const parsed = [];
  for (const seed of [1, 2, 3]) {
    let completion;
    try {
      completion = await client.chat.completions.parse({
        model: MODEL,
        messages: [{ role: "user", content: "Review a product you bought, as JSON." }],
        response_format: zodResponseFormat(Review, "review"),
        temperature: 1,
        seed,
        max_tokens: 200,
      });
    } catch (error) {
      if (error instanceof LengthFinishReasonError) continue; // a cut reply cannot parse; not a failure
      throw error;
    }
    const { message, finish_reason } = completion.choices[0];
    assert.equal(finish_reason, "stop");
    assert.ok(message.parsed, `seed ${seed}: nothing parsed from ${JSON.stringify(message.content)}`);
    const review = Review.parse(message.parsed); // the SDK validated already; say so again, loudly
    assert.ok(Number.isInteger(review.stars) && review.stars >= 1 && review.stars <= 5, `stars ${review.stars}`);
    assert.ok(Number.isSafeInteger(review.quantity), `quantity ${review.quantity}`);
    assert.ok(review.product.length <= 20, `product ${JSON.stringify(review.product)}`);
    assert.deepEqual(JSON.parse(message.content), message.parsed);
    parsed.push(review);
  }
  assert.ok(parsed.length >= 2, `only ${parsed.length} of 3 replies finished to parse`);
});

test("parse with zod function and a named tool choice", async () => {
  // min(1): an empty city would be valid for a bare z.string(), and this model sometimes writes one.
  const tool = zodFunction({ name: "get_weather", parameters: z.object({ city: z.string().min(1).max(30) }) });
  let checked = 0;
  for (const seed of [1, 2, 3]) {
    let completion;
    try {
      completion = await client.chat.completions.parse({
        model: MODEL,
        messages: [{ role: "user", content: "What is the weather in Paris?" }],
        tools: [tool],
        tool_choice: { type: "function", function: { name: "get_weather" } },
        temperature: 1,
        seed,
        max_tokens: 120,
      });
    } catch (error) {
      if (error instanceof LengthFinishReasonError) continue;
      throw error;
    }
    const { message, finish_reason } = completion.choices[0];
    const calls = message.tool_calls ?? [];
    assert.equal(calls.length, 1, `seed ${seed}: expected exactly one tool call, got ${JSON.stringify(calls)}`);
    assert.equal(finish_reason, "tool_calls");
    assert.equal(message.content, null);
    const [call] = calls;
    assert.equal(call.type, "function");
    assert.match(call.id, /^call_/);
    assert.equal(call.function.name, "get_weather");
    const args = call.function.parsed_arguments;
    assert.ok(typeof args?.city === "string" && args.city.length > 0, `parsed_arguments ${JSON.stringify(args)}`);
    assert.deepEqual(JSON.parse(call.function.arguments), args);
    checked += 1;
  }
  assert.ok(checked >= 2, `only ${checked} of 3 replies finished their call`);
});

test("abort mid stream", async () => {
  const long = [{ role: "user", content: "Write a long story about a dragon and a knight." }];
  const body = { model: MODEL, messages: long, max_tokens: 300, temperature: 1, seed: 7, stream: true };

  // The raw stream: aborting its controller ends `for await` early, without an error (the SDK's contract).
  const stream = await client.chat.completions.create(body);
  const seen = [];
  for await (const chunk of stream) {
    seen.push(chunk);
    if (seen.length === 3) stream.controller.abort();
  }
  // (Chunks already read off the socket may still come out.)
  assert.ok(seen.length >= 3 && seen.length < 30, `iteration went on after abort: ${seen.length} chunks`);
  assert.ok(stream.controller.signal.aborted);
  assert.ok(seen.every((c) => !c.choices[0]?.finish_reason), "the reply finished, so nothing was aborted");

  // The stream helper: an AbortController's abort rejects with APIUserAbortError.
  const controller = new AbortController();
  const runner = client.chat.completions.stream(body, { signal: controller.signal });
  let chunks = 0;
  runner.on("chunk", () => {
    chunks += 1;
    if (chunks === 3) controller.abort();
  });
  await assert.rejects(runner.finalChatCompletion(), (error) => {
    assert.ok(error instanceof APIUserAbortError, `expected APIUserAbortError, got ${error}`);
    return true;
  });
  assert.ok(runner.aborted);
  assert.ok(chunks >= 3 && chunks < 300, `${chunks} chunks`);

  // And the server keeps serving.
  const after = await client.chat.completions.create({ model: MODEL, messages: HELLO, max_tokens: 8 });
  assert.ok(after.choices[0].message.content?.trim(), "no reply after the aborted streams");
});

test("errors are typed", async () => {
  for (const stream of [false, true]) {
    const unknown = client.chat.completions.create({ model: "no-such-model", messages: HELLO, max_tokens: 4, stream });
    await assert.rejects(unknown, (error) => {
      assert.ok(error instanceof OpenAI.NotFoundError, `stream=${stream}: expected NotFoundError, got ${error}`);
      assert.equal(error.status, 404);
      assert.equal(error.code, "model_not_found");
      assert.match(error.message, /no-such-model/);
      return true;
    });
  }
  const hot = client.chat.completions.create({ model: MODEL, messages: HELLO, max_tokens: 4, temperature: 5 });
  await assert.rejects(hot, (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError, `expected BadRequestError, got ${error}`);
    assert.equal(error.status, 400);
    assert.equal(error.param, "temperature");
    assert.equal(error.type, "invalid_request_error");
    return true;
  });
  await assert.rejects(client.models.retrieve("no-such-model"), OpenAI.NotFoundError);
});

test("models list and retrieve", async () => {
  const ids = [];
  for await (const model of client.models.list()) {
    assert.equal(model.object, "model");
    ids.push(model.id);
  }
  assert.ok(ids.includes(MODEL), `${MODEL} not in ${JSON.stringify(ids)}`);
  const model = await client.models.retrieve(MODEL);
  assert.equal(model.id, MODEL);
  assert.equal(model.object, "model");
  assert.ok(Number.isInteger(model.created), `created ${model.created}`);
  assert.equal(typeof model.owned_by, "string");
});

test("predicted outputs", async () => {
  // OpenAI's own example: the file is the prediction; the edited file comes back with the counts in usage.
  const code = 'class User:\n    def __init__(self, name, email):\n        self.name = name\n        self.email = email\n';
  const messages = [
    { role: "system", content: "You are a code editor. Reply with the complete edited file and nothing else." },
    { role: "user", content: "Replace every `name` with `username` in this file:\n\n```python\n" + code + "```" },
  ];
  const request = { model: MODEL, messages, max_tokens: 80, temperature: 0 };
  const predicted = await client.chat.completions.create({ ...request, prediction: { type: "content", content: code } });
  const plain = await client.chat.completions.create(request);
  assert.equal(predicted.choices[0].message.content, plain.choices[0].message.content, "the prediction changed the reply");
  const details = predicted.usage.completion_tokens_details;
  assert.ok(details.accepted_prediction_tokens > 0, `accepted ${details.accepted_prediction_tokens}`);
  assert.ok(details.rejected_prediction_tokens >= 0, `rejected ${details.rejected_prediction_tokens}`);
  assert.equal(plain.usage.completion_tokens_details.accepted_prediction_tokens, 0);
  assert.equal(predicted.usage.completion_tokens, plain.usage.completion_tokens);
});
