// Package chatwire is a thin helper over chatwire's generated Go client (package chatwirev1).
//
// Requests are written as OpenAI JSON and parsed with the protobuf JSON mapping (protojson), so string-or-array
// fields (google.protobuf.Value), tool parameters (Struct) and tool_choice need no hand-built messages; replies
// can be rendered back to OpenAI's JSON the same way, or read field by field from the typed messages.
package chatwire

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	chatwirev1 "github.com/chatwire/chatwire/gen/go/chatwire/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"
)

// Request parses an OpenAI Chat Completions request body into the gRPC request. Unknown keys are an error, as
// they are over HTTP.
func Request(openaiJSON []byte) (*chatwirev1.CreateChatCompletionRequest, error) {
	request := &chatwirev1.CreateChatCompletionRequest{}
	if err := protojson.Unmarshal(openaiJSON, request); err != nil {
		return nil, fmt.Errorf("chatwire: not a chat completion request: %w", err)
	}
	return request, nil
}

// JSON renders a reply (or any chatwire message) as OpenAI's JSON, as the HTTP edge does: snake_case keys, zeros
// and empty lists printed, unset message fields left out, JSON nulls where the reply holds them.
func JSON(message proto.Message) ([]byte, error) {
	raw, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(message)
	if err != nil {
		return nil, err
	}
	// UseNumber keeps every number exactly as protojson printed it.
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	var object map[string]any
	if err := decoder.Decode(&object); err != nil {
		return nil, err
	}
	// protojson's EmitUnpopulated also prints unset messages as null; the edge (and OpenAI) leaves them out.
	dropUnset(message.ProtoReflect(), object)
	return json.Marshal(object)
}

func dropUnset(message protoreflect.Message, object map[string]any) {
	fields := message.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		field := fields.Get(i)
		name := string(field.Name())
		switch {
		case field.IsMap():
		case field.IsList():
			items, _ := object[name].([]any)
			if field.Message() != nil && !isWellKnown(field.Message()) {
				list := message.Get(field).List()
				for j := 0; j < list.Len() && j < len(items); j++ {
					if item, ok := items[j].(map[string]any); ok {
						dropUnset(list.Get(j).Message(), item)
					}
				}
			}
		case field.HasPresence() && !message.Has(field):
			delete(object, name)
		case field.Message() != nil && !isWellKnown(field.Message()):
			if nested, ok := object[name].(map[string]any); ok {
				dropUnset(message.Get(field).Message(), nested)
			}
		}
	}
}

func isWellKnown(message protoreflect.MessageDescriptor) bool {
	return message.ParentFile().Package() == "google.protobuf"
}

// Text is the string in a Value field (a reply's message content, a chunk's finish_reason): "" when it is JSON
// null or unset.
func Text(value *structpb.Value) string {
	return value.GetStringValue()
}

// WithAPIKey returns a context whose calls carry the API key as `authorization: Bearer <key>` metadata.
func WithAPIKey(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
}

// TransportCredentials is TLS (1.2 or later) for grpc.WithTransportCredentials: the server's certificate must
// chain to a CA in caFile (PEM; the system's roots are not consulted) and name the host dialled. With certFile
// and keyFile (PEM, both or neither) the client presents that certificate, for servers that require mutual TLS.
func TransportCredentials(caFile, certFile, keyFile string) (credentials.TransportCredentials, error) {
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("chatwire: a client certificate needs its key, and a key its certificate")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("chatwire: CA file: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("chatwire: no PEM certificate in %s", caFile)
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	if certFile != "" {
		certificate, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("chatwire: client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{certificate}
	}
	return credentials.NewTLS(config), nil
}

// AffinityHeader is the metadata that keys a chat call to a replica: Envoy's gRPC listener cannot read protobuf
// bodies, so it hashes this header to send a conversation's calls to the replica whose prefix cache holds it.
const AffinityHeader = "x-chatwire-affinity"

// ReplicaHeader is the metadata in every reply that names the replica that served it.
const ReplicaHeader = "x-chatwire-replica"

// maxAffinityKey bounds the header, as the HTTP edge does: longer keys are hashed on their first 256 bytes.
const maxAffinityKey = 256

const streamChat = "/chatwire.v1.ChatService/StreamChatCompletion"

// AffinityKey is the key a chat request is balanced by: the first of prompt_cache_key, safety_identifier and user
// (most specific first) that is set and printable ASCII, cut to its first 256 bytes; "" when none is. It is the
// HTTP edge's rule for JSON bodies, except that the edge also keys by UTF-8 values: gRPC metadata is printable
// ASCII only (grpcio and newer grpc-go fail the call otherwise), so here such a value is skipped, as the edge
// skips one with control characters.
func AffinityKey(request *chatwirev1.CreateChatCompletionRequest) string {
	for _, key := range []string{request.GetPromptCacheKey(), request.GetSafetyIdentifier(), request.GetUser()} {
		if key != "" && printable(key) {
			if len(key) > maxAffinityKey {
				key = key[:maxAffinityKey]
			}
			return key
		}
	}
	return ""
}

func printable(key string) bool {
	for i := 0; i < len(key); i++ {
		if key[i] < 0x20 || key[i] > 0x7e {
			return false
		}
	}
	return true
}

// withAffinity adds the request's AffinityKey to ctx's metadata, unless the caller set the header itself.
func withAffinity(ctx context.Context, request *chatwirev1.CreateChatCompletionRequest) context.Context {
	md, _ := metadata.FromOutgoingContext(ctx)
	if key := AffinityKey(request); key != "" && len(md.Get(AffinityHeader)) == 0 {
		return metadata.AppendToOutgoingContext(ctx, AffinityHeader, key)
	}
	return ctx
}

// UnaryAffinity is a unary client interceptor that sends CreateChatCompletion's AffinityKey as AffinityHeader
// metadata (unless the call already carries that header). Dial with it and StreamAffinity:
//
//	grpc.Dial(addr, grpc.WithInsecure(), grpc.WithChainUnaryInterceptor(chatwire.UnaryAffinity),
//		grpc.WithChainStreamInterceptor(chatwire.StreamAffinity))
//
// For TLS, grpc.WithTransportCredentials(creds), creds from TransportCredentials, takes grpc.WithInsecure()'s place.
func UnaryAffinity(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if request, ok := req.(*chatwirev1.CreateChatCompletionRequest); ok {
		ctx = withAffinity(ctx, request)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// StreamAffinity is UnaryAffinity for StreamChatCompletion. A stream sends its headers when it opens, before its
// request, so this one opens it at the first SendMsg (which the generated client makes at once), key in hand.
func StreamAffinity(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
	streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if method != streamChat {
		return streamer(ctx, desc, cc, method, opts...)
	}
	return &keyedStream{ctx: ctx, open: func(ctx context.Context) (grpc.ClientStream, error) {
		return streamer(ctx, desc, cc, method, opts...)
	}}, nil
}

// keyedStream opens its stream at its first use, keyed by the request if that use is SendMsg(request).
type keyedStream struct {
	ctx    context.Context
	open   func(context.Context) (grpc.ClientStream, error)
	stream grpc.ClientStream
	err    error
}

func (s *keyedStream) opened(message interface{}) error {
	if s.stream == nil && s.err == nil {
		ctx := s.ctx
		if request, ok := message.(*chatwirev1.CreateChatCompletionRequest); ok {
			ctx = withAffinity(ctx, request)
		}
		s.stream, s.err = s.open(ctx)
	}
	return s.err
}

func (s *keyedStream) SendMsg(m interface{}) error {
	if err := s.opened(m); err != nil {
		return err
	}
	return s.stream.SendMsg(m)
}

func (s *keyedStream) RecvMsg(m interface{}) error {
	if err := s.opened(nil); err != nil {
		return err
	}
	return s.stream.RecvMsg(m)
}

func (s *keyedStream) CloseSend() error {
	if err := s.opened(nil); err != nil {
		return err
	}
	return s.stream.CloseSend()
}

func (s *keyedStream) Header() (metadata.MD, error) {
	if err := s.opened(nil); err != nil {
		return nil, err
	}
	return s.stream.Header()
}

func (s *keyedStream) Trailer() metadata.MD {
	if s.stream == nil {
		return nil
	}
	return s.stream.Trailer()
}

func (s *keyedStream) Context() context.Context {
	if s.stream == nil {
		return s.ctx
	}
	return s.stream.Context()
}

// Replica is the replica that served a call, from its ReplicaHeader: in the reply's header, or in the trailer of a
// call refused before any reply; "" when neither names one.
func Replica(header, trailer metadata.MD) string {
	for _, md := range []metadata.MD{header, trailer} {
		if values := md.Get(ReplicaHeader); len(values) > 0 {
			return values[0]
		}
	}
	return ""
}

// Error is what a failed call says: the gRPC status, its google.rpc details, and the OpenAI error body.
type Error struct {
	// Code is the gRPC status code, e.g. codes.NotFound.
	Code codes.Code
	// Message is the status message (the OpenAI error message).
	Message string
	// Reason is ErrorInfo.reason: the OpenAI error code in upper case, e.g. "MODEL_NOT_FOUND".
	Reason string
	// Domain is ErrorInfo.domain ("chatwire.dev"); Metadata holds the OpenAI "type" and, when known, "param".
	Domain   string
	Metadata map[string]string
	// Field is BadRequest's field violation: the OpenAI param of an invalid request.
	Field string
	// OpenAI is the `x-chatwire-error` trailer, the `{"error": {...}}` body HTTP clients get; nil when absent
	// (e.g. when the caller cancelled or its deadline passed).
	OpenAI *chatwirev1.ErrorResponse
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s %s: %s", e.Code, e.Reason, e.Message)
}

// ErrorOf decodes a call's error with the trailer it received: grpc.Trailer(&trailer) for unary calls,
// stream.Trailer() for streams. It returns nil for a nil error.
func ErrorOf(err error, trailer metadata.MD) *Error {
	if err == nil {
		return nil
	}
	var decoded *Error
	if errors.As(err, &decoded) {
		return decoded
	}
	st := status.Convert(err)
	decoded = &Error{Code: st.Code(), Message: st.Message()}
	for _, detail := range st.Details() {
		switch detail := detail.(type) {
		case *errdetails.ErrorInfo:
			decoded.Reason, decoded.Domain, decoded.Metadata = detail.Reason, detail.Domain, detail.Metadata
		case *errdetails.BadRequest:
			if violations := detail.GetFieldViolations(); len(violations) > 0 {
				decoded.Field = violations[0].Field
			}
		}
	}
	if values := trailer.Get("x-chatwire-error"); len(values) > 0 {
		body := &chatwirev1.ErrorResponse{}
		// DiscardUnknown: a key added to the body later must not cost the caller the whole error.
		if (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(values[0]), body) == nil {
			decoded.OpenAI = body
		}
	}
	return decoded
}
