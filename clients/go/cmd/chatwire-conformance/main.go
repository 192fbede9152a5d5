// Command chatwire-conformance runs one of tests/test_polyglot.py's scenarios against a live server. It reads
//
//	{"address", "api_key"?, "rpc": "unary" | "stream", "request": <OpenAI JSON>, "timeout_ms"?, "cancel_after"?,
//	 "metadata"?: {name: value}, "tls"?: {"ca_file", "cert_file"?, "key_file"?}}
//
// from stdin and prints what came back as OpenAI JSON: {"response"} | {"chunks", "error"?} | {"error"}, each with
// "replica" (the x-chatwire-replica the call received, or null).
package main

import (
	"context"
	"encoding/json"
	"io"
	"log"
	"os"
	"time"

	"github.com/chatwire/chatwire/clients/go/chatwire"
	chatwirev1 "github.com/chatwire/chatwire/gen/go/chatwire/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

type call struct {
	Address     string            `json:"address"`
	APIKey      string            `json:"api_key"`
	RPC         string            `json:"rpc"`
	Request     json.RawMessage   `json:"request"`
	TimeoutMS   int               `json:"timeout_ms"`
	CancelAfter int               `json:"cancel_after"`
	Metadata    map[string]string `json:"metadata"`
	TLS         *struct {
		CAFile   string `json:"ca_file"`
		CertFile string `json:"cert_file"`
		KeyFile  string `json:"key_file"`
	} `json:"tls"`
}

func main() {
	var c call
	if err := json.NewDecoder(os.Stdin).Decode(&c); err != nil {
		log.Fatal(err)
	}
	request, err := chatwire.Request(c.Request)
	if err != nil {
		log.Fatal(err)
	}
	transport := grpc.WithInsecure()
	if c.TLS != nil {
		creds, err := chatwire.TransportCredentials(c.TLS.CAFile, c.TLS.CertFile, c.TLS.KeyFile)
		if err != nil {
			log.Fatal(err)
		}
		transport = grpc.WithTransportCredentials(creds)
	}
	conn, err := grpc.Dial(c.Address, transport, grpc.WithChainUnaryInterceptor(chatwire.UnaryAffinity),
		grpc.WithChainStreamInterceptor(chatwire.StreamAffinity))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := chatwirev1.NewChatServiceClient(conn)

	timeout := 120 * time.Second
	if c.TimeoutMS > 0 {
		timeout = time.Duration(c.TimeoutMS) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if c.APIKey != "" {
		ctx = chatwire.WithAPIKey(ctx, c.APIKey)
	}
	for name, value := range c.Metadata {
		ctx = metadata.AppendToOutgoingContext(ctx, name, value)
	}

	result := map[string]any{}
	if c.RPC == "unary" {
		var header, trailer metadata.MD
		reply, err := client.CreateChatCompletion(ctx, request, grpc.Header(&header), grpc.Trailer(&trailer))
		result["replica"] = replica(header, trailer)
		if err != nil {
			result["error"] = describe(chatwire.ErrorOf(err, trailer))
		} else {
			result["response"] = openai(reply)
		}
	} else {
		chunks := []json.RawMessage{}
		stream, err := client.StreamChatCompletion(ctx, request)
		for err == nil {
			var chunk *chatwirev1.CreateChatCompletionStreamResponse
			// After cancel(), Recv may still hand over chunks that had arrived; the caller no longer wants them.
			if chunk, err = stream.Recv(); err == nil && ctx.Err() == nil {
				chunks = append(chunks, openai(chunk))
				if len(chunks) == c.CancelAfter {
					cancel()
				}
			}
		}
		result["chunks"] = chunks
		var header, trailer metadata.MD
		if stream != nil {
			header, _ = stream.Header()
			trailer = stream.Trailer()
		}
		result["replica"] = replica(header, trailer)
		if err != io.EOF {
			result["error"] = describe(chatwire.ErrorOf(err, trailer))
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		log.Fatal(err)
	}
}

func openai(message proto.Message) json.RawMessage {
	raw, err := chatwire.JSON(message)
	if err != nil {
		log.Fatal(err)
	}
	return raw
}

// replica is chatwire.Replica, null when the call received none.
func replica(header, trailer metadata.MD) any {
	if name := chatwire.Replica(header, trailer); name != "" {
		return name
	}
	return nil
}

func describe(err *chatwire.Error) map[string]any {
	described := map[string]any{
		"code": int(err.Code), "message": err.Message, "reason": err.Reason, "domain": err.Domain,
		"metadata": err.Metadata, "field": err.Field,
	}
	if err.OpenAI != nil {
		described["openai"] = openai(err.OpenAI)
	}
	return described
}
