// Package source reads an upstream over HTTP and hands over raw JSON values:
// whole documents from a polled URL, or NDJSON lines from a tailed one. It
// knows about validators, backoff and cursors, and nothing about SSE.
package source

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/target"
)

// Sink receives what a source reads.
type Sink interface {
	// Answered tells the sink the status of an upstream answer: the
	// response's status code, or 0 when no response came (a network error,
	// a timeout, a refused redirect). A poll calls it for every request
	// once the answer is handled: after publishing the document if it
	// changed, and also when a 2xx body is refused as too large or not
	// JSON. A tail calls it for every connection when the response's
	// headers arrive, before publishing the stream's lines. Either way,
	// when it is called the sink has been handed everything the upstream
	// has said so far. A source stopped before a response came does not
	// call it.
	Answered(status int)
	// Publish hands over values that arrived together, oldest first: a
	// changed polled document, or NDJSON lines. It is never called empty.
	Publish(values []json.RawMessage)
	// LastID returns the id of the last event published, or "".
	LastID() string
}

// Observer is told what a source does, for metrics and tests.
type Observer interface {
	// UpstreamRequest records one request and its result: "ok",
	// "not_modified" or "error".
	UpstreamRequest(result string)
	// UpstreamError records one fault by reason, such as "status",
	// "invalid_json", "too_large" or "connect".
	UpstreamError(reason string)
}

// Config is what both sources need to reach an upstream.
type Config struct {
	// Target builds each upstream request, given the id of the last event
	// published.
	Target *target.Bound
	// Redacted is the upstream's URL as logs show it, without secrets: the
	// template's Redacted.
	Redacted string
	// Timeout bounds a poll request, or a tail request until its headers.
	Timeout time.Duration
	// ReadTimeout bounds the silence of a tailed stream: when no byte
	// arrives for this long, the connection is dropped, counted as a read
	// error and made again. Zero waits forever.
	ReadTimeout time.Duration
	// MaxBody bounds a polled body or one NDJSON line, in bytes.
	MaxBody int64
	// Backoff paces retries after failures.
	Backoff Backoff
	// Limit, unless nil, bounds the upstream requests in flight of all the
	// sources that share it to its capacity: a poll holds a slot from
	// before its request until its body is read, a tail from before it
	// connects until the response's headers arrive, never while it streams.
	// A source waits for a slot until its context ends.
	Limit    chan struct{}
	Logger   *zap.Logger
	Observer Observer
}

// Error reasons given to Observer.UpstreamError.
const (
	ReasonConnect     = "connect"
	ReasonStatus      = "status"
	ReasonInvalidJSON = "invalid_json"
	ReasonTooLarge    = "too_large"
	ReasonRead        = "read"
)

// errRedirect refuses a redirect off the configured origin, so that headers
// meant for the upstream, such as API keys, never reach another server nor
// cross the network in clear.
var errRedirect = errors.New("redirect off the upstream's scheme, host and port refused")

// newClient returns an HTTP client for one source. Redirects are followed
// within the upstream's origin only.
func newClient(headerTimeout time.Duration) *http.Client {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.ResponseHeaderTimeout = headerTimeout
	return &http.Client{
		Transport: transport,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if origin(req.URL) != origin(via[0].URL) {
				return errRedirect
			}
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			return nil
		},
	}
}

// origin returns the scheme and host:port of u, the port made explicit
// where it is the scheme's default: https://h and https://h:443 are one
// origin, https://h and http://h are two.
func origin(u *url.URL) string {
	port := u.Port()
	if port == "" {
		switch u.Scheme {
		case "http":
			port = "80"
		case "https":
			port = "443"
		}
	}
	return u.Scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// redact returns err with the URL that a *url.Error carries, the expanded
// one which may hold secrets from placeholders, replaced by c.Redacted. Only
// redacted errors are logged.
func (c *Config) redact(err error) error {
	var ue *url.Error
	if !errors.As(err, &ue) {
		return err
	}
	return &url.Error{Op: ue.Op, URL: c.Redacted, Err: ue.Err}
}

// failed records a request that failed for reason, unless ctx has ended: a
// source stopped mid-request is no fault of the upstream's.
func (c *Config) failed(ctx context.Context, reason string) {
	if ctx.Err() != nil {
		return
	}
	c.Observer.UpstreamRequest("error")
	c.Observer.UpstreamError(reason)
}

// acquire takes a slot of c.Limit, waiting for one, and reports whether it
// did before ctx ended.
func (c *Config) acquire(ctx context.Context) bool {
	if c.Limit == nil {
		return true
	}
	select {
	case c.Limit <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

// release gives back the slot taken by acquire.
func (c *Config) release() {
	if c.Limit != nil {
		<-c.Limit
	}
}

// newRequest builds the upstream request. When it cannot, the fault is
// recorded and sink told that no response came.
func (c *Config) newRequest(ctx context.Context, sink Sink) (*http.Request, error) {
	req, err := c.Target.Request(ctx, sink.LastID())
	if err != nil {
		c.Observer.UpstreamError(ReasonConnect)
		sink.Answered(0)
	}
	return req, err
}

// send makes the request. When no response comes, it records the failure
// and tells sink so, unless ctx has ended.
func (c *Config) send(ctx context.Context, client *http.Client, req *http.Request, sink Sink) (*http.Response, error) {
	resp, err := client.Do(req)
	if err != nil && ctx.Err() == nil {
		c.failed(ctx, ReasonConnect)
		sink.Answered(0)
	}
	return resp, err
}

// statusError is a non-2xx upstream answer.
type statusError struct {
	code       int
	retryAfter time.Duration
}

func (e *statusError) Error() string { return fmt.Sprintf("upstream answered %d", e.code) }

// checkStatus returns a *statusError for a non-2xx response, honouring
// Retry-After on 429 and 503.
func checkStatus(resp *http.Response, now time.Time) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	err := &statusError{code: resp.StatusCode}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		err.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), now)
	}
	return err
}

// parseRetryAfter reads a Retry-After value in seconds or as an HTTP date.
// Seconds are capped at maxRetryAfter so that a huge value cannot overflow.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil && secs > 0 {
		return time.Duration(min(secs, int(maxRetryAfter/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// Backoff computes exponential delays with jitter between retries.
type Backoff struct {
	// Initial is the first delay.
	Initial time.Duration
	// Max caps the exponential delay.
	Max time.Duration
}

// maxRetryAfter caps how long an upstream's Retry-After may hold a source.
const maxRetryAfter = 10 * time.Minute

// Delay returns the delay before retry number attempt (from 1), jittered to
// between half and all of the exponential value, and never shorter than
// retryAfter (itself capped at ten minutes).
func (b Backoff) Delay(attempt int, retryAfter time.Duration) time.Duration {
	d := b.Initial
	for i := 1; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	d = d/2 + rand.N(d/2+1)
	return max(d, min(retryAfter, maxRetryAfter))
}

// sleep waits for d or until ctx ends, and reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// retryAfterOf returns the Retry-After carried by err, if any.
func retryAfterOf(err error) time.Duration {
	var se *statusError
	if errors.As(err, &se) {
		return se.retryAfter
	}
	return 0
}
