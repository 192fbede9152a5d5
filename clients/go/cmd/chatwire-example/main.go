// Command chatwire-example calls chatwire over gRPC from Go: one reply, then the same conversation streamed.
//
//	chatwire-example [-addr 127.0.0.1:50050] [-key sk-...] [-ca ca.pem [-cert client.pem -cert-key client-key.pem]] \
//		"Say hello."
//
// With -ca (or CHATWIRE_CA_FILE) it speaks TLS, and with -cert and -cert-key (or CHATWIRE_CLIENT_CERT_FILE and
// CHATWIRE_CLIENT_KEY_FILE) mutual TLS; -key stays the API key.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"time"

	"github.com/chatwire/chatwire/clients/go/chatwire"
	chatwirev1 "github.com/chatwire/chatwire/gen/go/chatwire/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50050", "chatwire's gRPC address: the edge's internal listener, or one replica")
	key := flag.String("key", os.Getenv("CHATWIRE_API_KEY"), "API key, if the server requires one")
	ca := flag.String("ca", os.Getenv("CHATWIRE_CA_FILE"), "CA certificate (PEM) for the server's: TLS, not plaintext")
	cert := flag.String("cert", os.Getenv("CHATWIRE_CLIENT_CERT_FILE"), "client certificate (PEM), for mutual TLS")
	certKey := flag.String("cert-key", os.Getenv("CHATWIRE_CLIENT_KEY_FILE"), "the client certificate's key (PEM)")
	flag.Parse()
	prompt := "Say hello."
	if flag.NArg() > 0 {
		prompt = flag.Arg(0)
	}

	transport := grpc.WithInsecure()
	if *ca != "" {
		creds, err := chatwire.TransportCredentials(*ca, *cert, *certKey)
		if err != nil {
			log.Fatal(err)
		}
		transport = grpc.WithTransportCredentials(creds)
	} else if *cert != "" || *certKey != "" {
		// A client certificate without a CA would otherwise go unused over plaintext.
		log.Fatal("a client certificate needs -ca (CHATWIRE_CA_FILE) too")
	}
	// The affinity interceptors send each chat request's key (prompt_cache_key, else safety_identifier, else user)
	// as x-chatwire-affinity metadata: behind Envoy's gRPC listener, the key's calls reach one replica.
	conn, err := grpc.Dial(*addr, transport, grpc.WithChainUnaryInterceptor(chatwire.UnaryAffinity),
		grpc.WithChainStreamInterceptor(chatwire.StreamAffinity))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	client := chatwirev1.NewChatServiceClient(conn)

	// A deadline travels as grpc-timeout: the server stops work for a caller that has given up.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Ctrl-C cancels the context: the call ends at once and the server frees the sequence.
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	if *key != "" {
		ctx = chatwire.WithAPIKey(ctx, *key)
	}

	// The request is OpenAI's JSON; protojson fills the Value and Struct fields. Both calls below share the
	// conversation, so they share a prompt_cache_key: the second finds its prefix cached on the same replica.
	conversation := make([]byte, 8)
	if _, err := rand.Read(conversation); err != nil {
		log.Fatal(err)
	}
	body, _ := json.Marshal(map[string]any{
		"model":            "smollm2-135m-instruct",
		"messages":         []map[string]any{{"role": "user", "content": prompt}},
		"max_tokens":       48,
		"prompt_cache_key": fmt.Sprintf("example-%x", conversation),
	})
	request, err := chatwire.Request(body)
	if err != nil {
		log.Fatal(err)
	}

	var trailer metadata.MD
	reply, err := client.CreateChatCompletion(ctx, request, grpc.Trailer(&trailer))
	if err != nil {
		fail(chatwire.ErrorOf(err, trailer))
	}
	fmt.Println(chatwire.Text(reply.Choices[0].Message.GetContent()))

	stream, err := client.StreamChatCompletion(ctx, request)
	if err != nil {
		fail(chatwire.ErrorOf(err, nil))
	}
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(chatwire.ErrorOf(err, stream.Trailer()))
		}
		for _, choice := range chunk.Choices {
			fmt.Print(choice.GetDelta().GetContent())
		}
	}
	fmt.Println()
}

// fail reports an error the way a service would log it: status, OpenAI code, the field at fault.
func fail(err *chatwire.Error) {
	if err.OpenAI != nil {
		body, _ := chatwire.JSON(err.OpenAI)
		log.Printf("x-chatwire-error: %s", body)
	}
	log.Fatalf("%s (reason %s, field %q): %s", err.Code, err.Reason, err.Field, err.Message)
}
